//! Shared memory: who writes where (fencing of canonical spaces), dedup and
//! idempotency, versions and history, close and purge, forks, trust and circles,
//! embeddings, and memory-log positions that become visible in order.

use crate::harness::*;
use concord_core::api::{Instance, Role};
use concord_core::authz::Principal;
use concord_core::memory::{content_hash, Space, Visibility};
use concord_core::token::TokenKind;
use concord_core::{ids, ErrorCode};
use concord_store::{
    memory_topics, DynStore, MemoryClose, MemoryPromote, MemoryUpdate, MemoryWrite, NewMemory,
    StoredMemory, Written,
};
use serde_json::json;
use std::collections::HashSet;
use std::time::{Duration, Instant};

conformance!(
    memory_canonical_writes_are_fenced,
    memory_space_write_rules,
    memory_dedup_and_idempotency,
    memory_versions_history_close_purge,
    memory_bad_input_writes_nothing,
    memory_fork_point_diff_and_promote,
    memory_trust_and_circles,
    memory_embeddings_fill_in_later,
    memory_log_positions_become_visible_in_order,
);

fn mem(space: &str, text: &str) -> NewMemory {
    let space = Space::parse("space", space).expect("space");
    let visibility = Visibility::default_for(&space);
    NewMemory {
        id: ids::new_id(ids::MEMORY),
        kind: "learning".into(),
        text: text.into(),
        tags: vec![],
        metadata: json!({}),
        content_hash: content_hash("learning", text, &[], &json!({})),
        visibility,
        space,
        embedding: None,
        embed_pending: false,
        fence: None,
        valid_at: None,
        idempotency_key: None,
    }
}

fn fenced(mut m: NewMemory, fence: Option<u64>) -> NewMemory {
    m.fence = fence;
    m
}

async fn write(store: &DynStore, actor: &Principal, m: NewMemory) -> concord_core::Result<Written> {
    store
        .write_memories(MemoryWrite {
            actor: actor.clone(),
            via: "http".into(),
            memories: vec![m],
            batch: false,
        })
        .await
        .map(|mut v| v.remove(0))
}

fn agent(entity: &str) -> Principal {
    Principal {
        token_id: "tok_agent".into(),
        kind: TokenKind::Agent,
        entity: Some(entity.into()),
        instance: None,
    }
}

async fn memory_canonical_writes_are_fenced(store: DynStore) {
    let reg = register(&store, "sisters", Role::Primary, Some("main")).await;
    let p = reg.instance;
    let fence = reg.fence;
    let s = register(&store, "sisters", Role::Secondary, Some("pane"))
        .await
        .instance;

    let w = write(
        &store,
        &session(&p),
        fenced(mem("entity:sisters", "deploy on fridays is risky"), fence),
    )
    .await
    .expect("primary with fence");
    let m = &w.memory.memory;
    assert!(!w.deduplicated);
    assert_eq!(m.provenance.instance.as_deref(), Some(p.id.as_str()));
    assert_eq!(m.provenance.entity.as_deref(), Some("sisters"));
    assert_eq!(m.provenance.role, Some(Role::Primary));
    assert_eq!(m.provenance.host.as_deref(), Some("laptop"));
    assert_eq!(m.provenance.fence, fence);
    assert_eq!(m.visibility, "entity");
    assert_eq!(m.version, 1);
    assert!(m.seq > 0);

    expect_err(
        write(&store, &session(&p), mem("entity:sisters", "no fence")).await,
        ErrorCode::Fenced,
    );
    let e = expect_err(
        write(
            &store,
            &session(&s),
            fenced(mem("entity:sisters", "a secondary"), fence),
        )
        .await,
        ErrorCode::Fenced,
    );
    assert_eq!(e.details["epoch"], json!(fence));

    // After a transfer the old primary's fence is stale, the new one's works.
    let g = store
        .transfer("sisters", Some(&p.id), &s.id)
        .await
        .expect("transfer");
    let e = expect_err(
        write(
            &store,
            &session(&p),
            fenced(mem("entity:sisters", "old primary"), fence),
        )
        .await,
        ErrorCode::Fenced,
    );
    assert_eq!(e.details["epoch"], json!(g.epoch));
    expect_err(
        write(
            &store,
            &session(&s),
            fenced(mem("entity:sisters", "stale fence"), fence),
        )
        .await,
        ErrorCode::Fenced,
    );
    write(
        &store,
        &session(&s),
        fenced(mem("entity:sisters", "new primary"), Some(g.fence)),
    )
    .await
    .expect("new primary with new fence");
    // Admin writes canonical memory without a fence.
    let a = write(&store, &admin(), mem("entity:sisters", "operator note"))
        .await
        .expect("admin");
    assert_eq!(a.memory.owner.entity.as_deref(), Some("sisters"));
    assert_eq!(a.memory.memory.provenance.instance, None);
}

async fn memory_space_write_rules(store: DynStore) {
    let a = register(&store, "anvil", Role::Secondary, Some("worker"))
        .await
        .instance;
    let ghost = register(&store, "anvil", Role::Secondary, None)
        .await
        .instance;
    let other = register(&store, "forge", Role::Secondary, Some("x"))
        .await
        .instance;

    let own = format!("instance:{}", a.id);
    write(&store, &session(&a), mem(&own, "scratch"))
        .await
        .expect("own space");
    expect_err(
        write(&store, &session(&other), mem(&own, "not mine")).await,
        ErrorCode::Forbidden,
    );
    write(&store, &admin(), mem(&own, "admin may"))
        .await
        .expect("admin anywhere");

    write(
        &store,
        &session(&a),
        mem("shared:providers", "kimi drops requests at 03:00 UTC"),
    )
    .await
    .expect("labelled live instance writes shared");
    expect_err(
        write(&store, &session(&ghost), mem("shared:providers", "ghost")).await,
        ErrorCode::Forbidden,
    );
    expect_err(
        write(
            &store,
            &agent("anvil"),
            mem("shared:providers", "agent token"),
        )
        .await,
        ErrorCode::Forbidden,
    );
    // A closed instance is no longer live: it may not write anywhere.
    store.close_instance(&a.id, &admin()).await.expect("close");
    expect_err(
        write(&store, &session(&a), mem("shared:providers", "after close")).await,
        ErrorCode::Forbidden,
    );
    expect_err(
        write(&store, &session(&a), mem(&own, "after close")).await,
        ErrorCode::UnknownInstance,
    );
}

async fn memory_dedup_and_idempotency(store: DynStore) {
    let a = register(&store, "anvil", Role::Secondary, Some("worker"))
        .await
        .instance;
    let b = register(&store, "forge", Role::Secondary, Some("worker"))
        .await
        .instance;
    let first = write(
        &store,
        &session(&a),
        mem("shared:providers", "retry on 429"),
    )
    .await
    .unwrap();
    let again = write(
        &store,
        &session(&b),
        mem("shared:providers", "retry on 429"),
    )
    .await
    .unwrap();
    assert!(again.deduplicated);
    assert_eq!(again.memory.memory.id, first.memory.memory.id);
    // Same text elsewhere, or with another visibility, is not a duplicate.
    let elsewhere = write(&store, &session(&a), mem("shared:other", "retry on 429"))
        .await
        .unwrap();
    assert!(!elsewhere.deduplicated);
    let mut private = mem("shared:providers", "retry on 429");
    private.visibility = Visibility::Private;
    assert!(
        !write(&store, &session(&a), private)
            .await
            .unwrap()
            .deduplicated
    );

    // An idempotent retry returns the first write even if the content differs.
    let mut k1 = mem("shared:providers", "one");
    k1.idempotency_key = Some("k-1".into());
    let w1 = write(&store, &session(&a), k1).await.unwrap();
    let mut k2 = mem("shared:providers", "two");
    k2.idempotency_key = Some("k-1".into());
    let w2 = write(&store, &session(&a), k2).await.unwrap();
    assert!(w2.deduplicated);
    assert_eq!(w2.memory.memory.id, w1.memory.memory.id);
    // Keys are per caller.
    let mut k3 = mem("shared:providers", "three");
    k3.idempotency_key = Some("k-1".into());
    assert!(!write(&store, &session(&b), k3).await.unwrap().deduplicated);

    // A closed memory is no longer a duplicate target.
    store
        .close_memory(MemoryClose {
            actor: admin(),
            id: first.memory.memory.id.clone(),
            fence: None,
            purge: false,
        })
        .await
        .unwrap();
    let fresh = write(
        &store,
        &session(&a),
        mem("shared:providers", "retry on 429"),
    )
    .await
    .unwrap();
    assert!(!fresh.deduplicated);
}

fn upd(actor: &Principal, id: &str, text: &str, fence: Option<u64>) -> MemoryUpdate {
    MemoryUpdate {
        actor: actor.clone(),
        via: "http".into(),
        id: id.into(),
        new_id: ids::new_id(ids::MEMORY),
        fence,
        kind: None,
        text: Some(text.into()),
        tags: Some(vec!["b".into()]),
        metadata: None,
        visibility: None,
        embedding: None,
        embed_pending: false,
        valid_at: None,
    }
}

async fn memory_versions_history_close_purge(store: DynStore) {
    let reg = register(&store, "sisters", Role::Primary, Some("main")).await;
    let (p, fence) = (session(&reg.instance), reg.fence);
    let s = register(&store, "sisters", Role::Secondary, Some("pane"))
        .await
        .instance;
    let before = store.last_event_seq().await.unwrap();
    let v1 = write(
        &store,
        &p,
        fenced(mem("entity:sisters", "model is k2"), fence),
    )
    .await
    .unwrap()
    .memory
    .memory;

    expect_err(
        store
            .update_memory(upd(&session(&s), &v1.id, "x", fence))
            .await,
        ErrorCode::Fenced,
    );
    let v2 = store
        .update_memory(upd(&p, &v1.id, "model is k2.5", fence))
        .await
        .unwrap()
        .memory;
    assert_eq!(v2.version, 2);
    assert_eq!(v2.supersedes.as_deref(), Some(v1.id.as_str()));
    assert_eq!(v2.tags, vec!["b".to_string()]);
    assert!(v2.seq > v1.seq);
    let old = store.get_memory(&v1.id).await.unwrap().unwrap();
    assert_eq!(old.memory.superseded_by.as_deref(), Some(v2.id.as_str()));
    assert!(old.memory.invalid_at.is_some());
    assert_eq!(old.closed_seq, Some(v2.seq));
    // A closed version cannot be updated again.
    expect_err(
        store.update_memory(upd(&p, &v1.id, "again", fence)).await,
        ErrorCode::Conflict,
    );

    let hist: Vec<i64> = store
        .memory_history(&v2.id)
        .await
        .unwrap()
        .iter()
        .map(|m| m.memory.version)
        .collect();
    assert_eq!(hist, vec![1, 2]);

    // Close: same write rules; idempotent.
    expect_err(
        store
            .close_memory(MemoryClose {
                actor: session(&s),
                id: v2.id.clone(),
                fence,
                purge: false,
            })
            .await,
        ErrorCode::Fenced,
    );
    let closed = store
        .close_memory(MemoryClose {
            actor: p.clone(),
            id: v2.id.clone(),
            fence,
            purge: false,
        })
        .await
        .unwrap();
    assert!(closed.memory.invalid_at.is_some());
    assert_eq!(closed.memory.superseded_by, None);
    let again = store
        .close_memory(MemoryClose {
            actor: p.clone(),
            id: v2.id.clone(),
            fence,
            purge: false,
        })
        .await
        .unwrap();
    assert_eq!(again.changed_seq, closed.changed_seq);

    // Purge: admin only; erases every version, leaves tombstones.
    expect_err(
        store
            .close_memory(MemoryClose {
                actor: p.clone(),
                id: v2.id.clone(),
                fence,
                purge: true,
            })
            .await,
        ErrorCode::Forbidden,
    );
    let purged = store
        .close_memory(MemoryClose {
            actor: admin(),
            id: v2.id.clone(),
            fence: None,
            purge: true,
        })
        .await
        .unwrap();
    assert!(purged.memory.purged);
    for m in store.memory_history(&v1.id).await.unwrap() {
        assert!(m.memory.purged);
        assert_eq!(m.memory.text, "");
        assert!(m.memory.tags.is_empty());
    }

    let events = events_after(&store, before).await;
    let mem_topics: Vec<&str> = topics_of(&events)
        .into_iter()
        .filter(|t| t.starts_with("sys.memory."))
        .collect();
    assert_eq!(
        mem_topics,
        vec![
            memory_topics::CREATED,
            memory_topics::UPDATED,
            memory_topics::CLOSED,
            memory_topics::PURGED
        ]
    );
    let created = events
        .iter()
        .find(|e| e.topic == memory_topics::CREATED)
        .unwrap();
    assert_eq!(created.data["id"], json!(v1.id));
    assert_eq!(created.data["space"], json!("entity:sisters"));
    assert_eq!(created.data["seq"], json!(v1.seq));
}

async fn memory_bad_input_writes_nothing(store: DynStore) {
    let a = register(&store, "anvil", Role::Secondary, Some("worker"))
        .await
        .instance;
    let before = store.last_memory_seq().await.unwrap();
    let mut circle = mem("shared:x", "for the ops circle");
    circle.visibility = Visibility::Circle("ops".into());
    let e = expect_err(
        write(&store, &session(&a), circle).await,
        ErrorCode::BadRequest,
    );
    assert_eq!(e.details["field"], "visibility");

    let mut v3 = mem("shared:x", "three");
    v3.embedding = Some(vec![1.0, 0.0, 0.0]);
    write(&store, &session(&a), v3).await.unwrap();
    let after_first = store.last_memory_seq().await.unwrap();
    assert!(after_first > before);
    // A batch whose second memory has the wrong dimension writes nothing.
    let mut ok = mem("shared:x", "fine");
    ok.embedding = Some(vec![0.0, 1.0, 0.0]);
    let mut bad = mem("shared:x", "wrong dimension");
    bad.embedding = Some(vec![1.0, 0.0]);
    let e = store
        .write_memories(MemoryWrite {
            actor: session(&a),
            via: "batch".into(),
            memories: vec![ok.clone(), bad],
            batch: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert_eq!(e.details["field"], "memories[1].embedding");
    assert!(store.get_memory(&ok.id).await.unwrap().is_none());
    assert_eq!(store.last_memory_seq().await.unwrap(), after_first);
    assert_eq!(store.space_dimension("shared:x").await.unwrap(), Some(3));
}

async fn memory_fork_point_diff_and_promote(store: DynStore) {
    let reg = register(&store, "sisters", Role::Primary, Some("main")).await;
    let (p, fence) = (session(&reg.instance), reg.fence);
    let before_fork = write(
        &store,
        &p,
        fenced(mem("entity:sisters", "known before the fork"), fence),
    )
    .await
    .unwrap()
    .memory
    .memory;
    let closed_later = write(
        &store,
        &p,
        fenced(mem("entity:sisters", "closed after the fork"), fence),
    )
    .await
    .unwrap()
    .memory
    .memory;

    let mut req = request("sisters", Role::Fork, Some("experiment"));
    req.forked_from = Some(reg.instance.id.clone());
    let fork = register_with(&store, req, TTL).await.instance;
    assert_eq!(
        fork.fork_point,
        Some(store.last_memory_seq().await.unwrap())
    );
    assert!(fork.fork_point.unwrap() >= closed_later.seq);

    let after_fork = write(
        &store,
        &p,
        fenced(mem("entity:sisters", "learned after the fork"), fence),
    )
    .await
    .unwrap()
    .memory
    .memory;
    store
        .close_memory(MemoryClose {
            actor: p.clone(),
            id: closed_later.id.clone(),
            fence,
            purge: false,
        })
        .await
        .unwrap();
    let fs = session(&fork);
    let branch_space = format!("instance:{}", fork.id);
    let b1 = write(
        &store,
        &fs,
        mem(&branch_space, "the fork found a faster build"),
    )
    .await
    .unwrap()
    .memory
    .memory;
    let b2 = write(&store, &fs, mem(&branch_space, "a dead end"))
        .await
        .unwrap()
        .memory
        .memory;
    // A fork writes its branch, never canonical.
    expect_err(
        write(&store, &fs, fenced(mem("entity:sisters", "sneaky"), fence)).await,
        ErrorCode::Fenced,
    );

    let diff = store.fork_diff(&fork.id).await.unwrap();
    assert_eq!(diff.fork_point, fork.fork_point.unwrap());
    let ids = |v: &[StoredMemory]| v.iter().map(|m| m.memory.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&diff.branch), vec![b1.id.clone(), b2.id.clone()]);
    let since = ids(&diff.canonical_since);
    assert!(since.contains(&after_fork.id) && since.contains(&closed_later.id));
    assert!(!since.contains(&before_fork.id));

    // Nothing merged by itself.
    let canonical_now: Vec<String> = store
        .memory_changes(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.memory.space == "entity:sisters")
        .map(|m| m.memory.text)
        .collect();
    assert!(!canonical_now.iter().any(|t| t.contains("faster build")));

    // Promotion: the primary with its fence; only branch memories.
    let bad = store
        .promote(MemoryPromote {
            actor: p.clone(),
            fork: fork.id.clone(),
            memory_ids: vec![before_fork.id.clone()],
            new_ids: vec![ids::new_id(ids::MEMORY)],
            fence,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.details["field"], "memory_ids[0]");
    expect_err(
        store
            .promote(MemoryPromote {
                actor: fs.clone(),
                fork: fork.id.clone(),
                memory_ids: vec![b1.id.clone()],
                new_ids: vec![ids::new_id(ids::MEMORY)],
                fence,
            })
            .await,
        ErrorCode::Fenced,
    );
    let before = store.last_event_seq().await.unwrap();
    let promoted = store
        .promote(MemoryPromote {
            actor: p.clone(),
            fork: fork.id.clone(),
            memory_ids: vec![b1.id.clone()],
            new_ids: vec![ids::new_id(ids::MEMORY)],
            fence,
        })
        .await
        .unwrap();
    let copy = &promoted[0].memory.memory;
    assert_eq!(copy.space, "entity:sisters");
    assert_eq!(copy.text, b1.text);
    assert_eq!(
        copy.provenance.promoted_from.as_deref(),
        Some(b1.id.as_str())
    );
    assert_eq!(copy.provenance.via, "promote");
    let events = events_after(&store, before).await;
    assert!(topics_of(&events).contains(&memory_topics::PROMOTED));
    // The branch keeps its memory.
    assert!(store
        .get_memory(&b1.id)
        .await
        .unwrap()
        .unwrap()
        .memory
        .is_open());
    // Not a fork: 400.
    assert_eq!(
        store.fork_diff(&reg.instance.id).await.unwrap_err().details["field"],
        "fork"
    );
}

async fn memory_trust_and_circles(store: DynStore) {
    let reg = register(&store, "sisters", Role::Primary, Some("main")).await;
    let s = register(&store, "sisters", Role::Secondary, Some("pane"))
        .await
        .instance;
    assert!(store.get_trust("sisters").await.unwrap().trusts.is_empty());
    let t = store
        .put_trust(
            "sisters",
            vec!["entity:anvil".into(), "circle:ops".into()],
            &session(&reg.instance),
        )
        .await
        .unwrap();
    assert_eq!(
        t.trusts,
        vec!["entity:anvil".to_string(), "circle:ops".to_string()]
    );
    expect_err(
        store.put_trust("sisters", vec![], &session(&s)).await,
        ErrorCode::Forbidden,
    );
    store
        .put_trust("anvil", vec!["entity:sisters".into()], &admin())
        .await
        .unwrap();
    assert_eq!(
        store.get_trust("anvil").await.unwrap().trusts,
        vec!["entity:sisters".to_string()]
    );

    expect_err(
        store
            .put_circle("ops", vec!["sisters".into()], &session(&s))
            .await,
        ErrorCode::Forbidden,
    );
    let c = store
        .put_circle(
            "ops",
            vec!["sisters".into(), "anvil".into(), "anvil".into()],
            &admin(),
        )
        .await
        .unwrap();
    assert_eq!(c.members, vec!["anvil".to_string(), "sisters".to_string()]);
    store.put_circle("dev", vec![], &admin()).await.unwrap();
    let names: Vec<String> = store
        .list_circles()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec!["dev".to_string(), "ops".to_string()]);
    // Now the circle exists, circle visibility is accepted.
    let mut m = mem("shared:ops", "for ops");
    m.visibility = Visibility::Circle("ops".into());
    write(&store, &session(&s), m)
        .await
        .expect("circle exists now");
}

async fn memory_embeddings_fill_in_later(store: DynStore) {
    let a = register(&store, "anvil", Role::Secondary, Some("worker"))
        .await
        .instance;
    let mut m1 = mem("shared:p", "first");
    m1.embed_pending = true;
    let mut m2 = mem("shared:p", "second");
    m2.embed_pending = true;
    let w1 = write(&store, &session(&a), m1).await.unwrap().memory;
    let w2 = write(&store, &session(&a), m2).await.unwrap().memory;
    assert_eq!(w1.memory.embedding_dim, None);
    let pending: Vec<String> = store
        .pending_embeddings(10)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(pending, vec![w1.memory.id.clone(), w2.memory.id.clone()]);
    let n = store
        .set_embeddings(vec![
            (w1.memory.id.clone(), vec![1.0, 2.0]),
            (w2.memory.id.clone(), vec![1.0, 2.0, 3.0]),
        ])
        .await
        .unwrap();
    assert_eq!(n, 1, "the second vector does not fit the space's dimension");
    assert!(store.pending_embeddings(10).await.unwrap().is_empty());
    let got = store.get_memory(&w1.memory.id).await.unwrap().unwrap();
    assert_eq!(got.memory.embedding_dim, Some(2));
    assert!(got.changed_seq > w2.changed_seq);
    let changes = store.memory_changes(w2.changed_seq, 10).await.unwrap();
    let filled = changes
        .iter()
        .find(|m| m.memory.id == w1.memory.id)
        .unwrap();
    assert_eq!(filled.embedding.as_deref(), Some(&[1.0f32, 2.0][..]));
}

/// Many concurrent writers while a follower tails `memory_changes` by watermark:
/// if a position could become visible after a higher one, the follower would
/// advance past it and never see it.
async fn memory_log_positions_become_visible_in_order(store: DynStore) {
    let writers: Vec<Instance> = {
        let mut v = vec![];
        for i in 0..6 {
            v.push(
                register(&store, &format!("e{i}"), Role::Secondary, Some("w"))
                    .await
                    .instance,
            );
        }
        v
    };
    let per = 20;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let follower = {
        let store = store.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut seen = HashSet::new();
            let mut watermark = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let batch = store.memory_changes(watermark, 50).await.expect("changes");
                for m in &batch {
                    assert!(m.changed_seq > watermark);
                    watermark = m.changed_seq;
                    seen.insert(m.memory.id.clone());
                }
                if batch.is_empty() {
                    if finished {
                        return seen;
                    }
                    tokio::task::yield_now().await;
                }
                assert!(Instant::now() < deadline, "follower timed out");
            }
        })
    };
    let mut tasks = vec![];
    for w in &writers {
        let (store, w) = (store.clone(), w.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = vec![];
            for j in 0..per {
                let m = write(
                    &store,
                    &session(&w),
                    mem("shared:race", &format!("{} says {j}", w.id)),
                )
                .await
                .expect("write");
                ids.push(m.memory.memory.id);
            }
            ids
        }));
    }
    let mut all = HashSet::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = follower.await.unwrap();
    assert_eq!(all.len(), writers.len() * per);
    let missed: Vec<_> = all.difference(&seen).collect();
    assert!(
        missed.is_empty(),
        "the follower skipped {} memories",
        missed.len()
    );
    let seqs: Vec<i64> = store
        .memory_changes(0, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|m| m.memory.seq)
        .collect();
    let mut sorted = seqs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), seqs.len(), "positions are unique");
}
