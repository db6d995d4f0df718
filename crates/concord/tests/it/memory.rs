//! Shared memory end to end, through the real binary and concord-client: the
//! visibility and trust matrix, fencing after a transfer, dedup, history and
//! `as_of`, forks, hybrid recall with a test embedder (and the embedder being
//! down), bad input, the write limit, persistence of the index, the CLI.

use crate::harness::*;
use concord_client::{memory, Client};
use concord_core::api::Role;
use concord_core::memory::{SearchRequest, UpdateMemoryRequest, WriteMemoryRequest};
use concord_core::token::TokenKind;
use concord_core::ErrorCode;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------- a small embeddings server ----------

const DIM: usize = 256;

/// Words with one meaning map to one concept, so that texts that say the same
/// thing in other words get close vectors (a stand-in for a real model).
fn concept(word: &str) -> &str {
    match word {
        "drops" | "drop" | "dropped" | "fails" | "fail" | "failing" | "failed" | "unreliable"
        | "outage" | "outages" | "errors" | "flaky" | "timeouts" => "failure",
        "provider" | "providers" | "vendor" | "vendors" => "provider",
        "night" | "nightly" | "midnight" | "03" | "3am" => "night",
        "requests" | "request" | "calls" => "request",
        w => w,
    }
}

fn embed(text: &str) -> Vec<f32> {
    let mut v = vec![0f32; DIM];
    for w in text
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let mut h: u64 = 0xcbf29ce484222325;
        for b in concept(w).bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        v[(h % DIM as u64) as usize] += 1.0;
    }
    v
}

/// An OpenAI-compatible `/v1/embeddings` on 127.0.0.1:0; answers 503 while `down`.
struct TestEmbedder {
    url: String,
    down: Arc<AtomicBool>,
}

async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = sock.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some(buf[end + 4..end + 4 + len].to_vec());
        }
    }
}

impl TestEmbedder {
    async fn start() -> TestEmbedder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let down = Arc::new(AtomicBool::new(false));
        let d = down.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let d = d.clone();
                tokio::spawn(async move {
                    while let Some(body) = read_request(&mut sock).await {
                        let (status, out) = if d.load(Ordering::SeqCst) {
                            ("503 Service Unavailable", json!({"error": "down"}))
                        } else {
                            let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            let inputs: Vec<String> = match &req["input"] {
                                Value::String(s) => vec![s.clone()],
                                Value::Array(a) => a
                                    .iter()
                                    .filter_map(|x| x.as_str().map(String::from))
                                    .collect(),
                                _ => vec![],
                            };
                            let data: Vec<Value> = inputs
                                .iter()
                                .enumerate()
                                .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": embed(t)}))
                                .collect();
                            (
                                "200 OK",
                                json!({"object": "list", "data": data, "model": req["model"]}),
                            )
                        };
                        let body = out.to_string();
                        let resp = format!(
                            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if sock.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        TestEmbedder { url, down }
    }
}

// ---------- helpers ----------

fn search(query: &str) -> SearchRequest {
    SearchRequest {
        query: query.into(),
        limit: Some(50),
        ..Default::default()
    }
}

async fn texts(c: &Client, req: &SearchRequest) -> BTreeSet<String> {
    c.recall(req)
        .await
        .expect("recall")
        .results
        .into_iter()
        .map(|h| h.memory.text)
        .collect()
}

fn set(xs: &[&str]) -> BTreeSet<String> {
    xs.iter().map(|s| s.to_string()).collect()
}

fn vis(space: &str, text: &str, visibility: &str) -> WriteMemoryRequest {
    let mut m = memory(space, text);
    m.visibility = Some(visibility.into());
    m
}

// ---------- tests ----------

#[tokio::test]
async fn memory_visibility_and_trust_matrix() {
    let hub = Hub::start();
    let admin = hub.admin();
    admin
        .put_circle("ops", vec!["sisters".into(), "anvil".into()])
        .await
        .unwrap();
    let (rp, p) = register(&admin, reg("sisters", Role::Primary, Some("main"))).await;
    let (rs, s) = register(&admin, reg("sisters", Role::Secondary, Some("pane"))).await;
    let (_, a) = register(&admin, reg("anvil", Role::Primary, Some("main"))).await;
    let (_, a2) = register(&admin, reg("anvil", Role::Secondary, Some("side"))).await;
    let (rf, f) = register(&admin, reg("forge", Role::Primary, Some("main"))).await;
    let reader = {
        let t = admin
            .create_token(&concord_core::api::CreateTokenRequest {
                kind: TokenKind::Reader,
                entity: None,
                name: None,
            })
            .await
            .unwrap();
        admin.with_token(t.token)
    };

    let mut canon = memory("entity:sisters", "sisters canonical zebra");
    canon.fence = rp.fence;
    p.remember(&canon).await.unwrap();
    let s_priv = s
        .remember(&memory(
            &format!("instance:{}", rs.instance.id),
            "sisters pane private zebra",
        ))
        .await
        .unwrap();
    a.remember(&vis("shared:providers", "anvil public zebra", "public"))
        .await
        .unwrap();
    a.remember(&vis("shared:providers", "anvil ops zebra", "circle:ops"))
        .await
        .unwrap();
    a2.remember(&vis("shared:x", "anvil side private zebra", "private"))
        .await
        .unwrap();
    a2.remember(&vis("shared:x", "anvil entity zebra", "entity"))
        .await
        .unwrap();
    f.remember(&vis("shared:providers", "forge public zebra", "public"))
        .await
        .unwrap();

    let q = search("zebra");
    let publics = ["anvil public zebra", "forge public zebra"];
    let expect = |extra: &[&str]| {
        let mut v: Vec<&str> = publics.to_vec();
        v.extend_from_slice(extra);
        set(&v)
    };
    assert_eq!(
        texts(&p, &q).await,
        expect(&["sisters canonical zebra", "anvil ops zebra"])
    );
    assert_eq!(
        texts(&s, &q).await,
        expect(&[
            "sisters canonical zebra",
            "anvil ops zebra",
            "sisters pane private zebra"
        ])
    );
    assert_eq!(
        texts(&a, &q).await,
        expect(&["anvil ops zebra", "anvil entity zebra"])
    );
    assert_eq!(
        texts(&a2, &q).await,
        expect(&[
            "anvil ops zebra",
            "anvil entity zebra",
            "anvil side private zebra"
        ])
    );
    assert_eq!(texts(&f, &q).await, expect(&[]));
    assert_eq!(texts(&reader, &q).await, expect(&[]));
    assert_eq!(texts(&admin, &q).await.len(), 7);
    // A memory one may not see is a 404 like one that does not exist.
    let e = f.memory(&s_priv.memory.id, false).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(s.memory(&s_priv.memory.id, true).await.is_ok());
    // Nothing invisible is even counted: the full answer is exactly the visible set.
    let hits = f.recall(&q).await.unwrap().results;
    assert_eq!(hits.len(), 2);
    assert!(hits.iter().all(|h| h.explain.bm25_rank.unwrap() <= 2));

    // Trust: sisters trusts anvil; forge is not trusted until named.
    let mut tq = search("zebra");
    tq.trusted_only = true;
    assert_eq!(
        texts(&p, &tq).await,
        set(&[
            "sisters canonical zebra",
            "anvil ops zebra",
            "anvil public zebra"
        ][..1])
    );
    let e = s
        .put_trust("sisters", vec!["entity:anvil".into()])
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden, "only the primary sets trust");
    p.put_trust("sisters", vec!["entity:anvil".into()])
        .await
        .unwrap();
    assert_eq!(
        texts(&p, &tq).await,
        set(&[
            "sisters canonical zebra",
            "anvil ops zebra",
            "anvil public zebra"
        ])
    );
    p.put_trust(
        "sisters",
        vec!["circle:ops".into(), format!("instance:{}", rf.instance.id)],
    )
    .await
    .unwrap();
    assert_eq!(
        texts(&p, &tq).await,
        set(&[
            "sisters canonical zebra",
            "anvil ops zebra",
            "anvil public zebra",
            "forge public zebra"
        ])
    );
    assert_eq!(p.trust("sisters").await.unwrap().trusts.len(), 2);
    // Writers filter.
    let mut wq = search("zebra");
    wq.writers.entities = vec!["forge".into()];
    assert_eq!(texts(&p, &wq).await, set(&["forge public zebra"]));
    // trusted_only needs an entity.
    let e = admin.recall(&tq).await.unwrap_err();
    assert_eq!(e.details["field"], "trusted_only");
}

#[tokio::test]
async fn memory_fencing_dedup_history_as_of_and_persistence() {
    let mut hub = Hub::start();
    let admin = hub.admin();
    let (rp, p) = register(&admin, reg("sisters", Role::Primary, Some("main"))).await;
    let (rs, s) = register(&admin, reg("sisters", Role::Secondary, Some("pane"))).await;
    let mut m = memory("entity:sisters", "the deploy model is k2");
    m.fence = rp.fence;
    m.tags = vec!["model".into()];
    let v1 = p.remember(&m).await.unwrap();
    assert!(!v1.deduplicated);
    assert_eq!(
        v1.memory.provenance.instance.as_deref(),
        Some(rp.instance.id.as_str())
    );
    assert_eq!(v1.memory.provenance.host.as_deref(), Some("testhost"));
    assert_eq!(v1.memory.provenance.via, "http");
    let again = p.remember(&m).await.unwrap();
    assert!(again.deduplicated);
    assert_eq!(again.memory.id, v1.memory.id);

    // After a transfer the old primary is fenced.
    let g = p.transfer("sisters", &rs.instance.id).await.unwrap();
    let mut stale = memory("entity:sisters", "old primary writes");
    stale.fence = rp.fence;
    let e = p.remember(&stale).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Fenced);
    assert_eq!(e.details["epoch"], json!(g.epoch));
    let e = s.remember(&stale).await.unwrap_err();
    assert_eq!(
        e.code,
        ErrorCode::Fenced,
        "the new primary with the old fence"
    );

    // New version by the new primary; as_of before it sees v1.
    let before_update = concord_core::Timestamp::now();
    eventually(Duration::from_secs(5), "the clock to move", || async {
        (concord_core::Timestamp::now() > before_update).then_some(())
    })
    .await;
    let v2 = s
        .update_memory(
            &v1.memory.id,
            &UpdateMemoryRequest {
                text: Some("the deploy model is k2.5".into()),
                fence: Some(g.fence),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .memory;
    assert_eq!(
        (v2.version, v2.supersedes.as_deref()),
        (2, Some(v1.memory.id.as_str()))
    );
    let e = p
        .update_memory(
            &v2.id,
            &UpdateMemoryRequest {
                text: Some("x".into()),
                fence: rp.fence,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Fenced);
    let h = s.memory(&v2.id, true).await.unwrap();
    let versions: Vec<i64> = h.history.unwrap().iter().map(|m| m.version).collect();
    assert_eq!(versions, vec![1, 2]);
    assert_eq!(
        texts(&s, &search("deploy model")).await,
        set(&["the deploy model is k2.5"])
    );
    let mut past = search("deploy model");
    past.as_of = Some(before_update);
    assert_eq!(texts(&s, &past).await, set(&["the deploy model is k2"]));
    let mut all = search("deploy model");
    all.include_closed = true;
    assert_eq!(texts(&s, &all).await.len(), 2);

    // The index survives a crash, and a deleted index is rebuilt from the store.
    hub.kill9();
    hub.spawn();
    assert_eq!(
        texts(&hub.admin(), &search("deploy model")).await,
        set(&["the deploy model is k2.5"])
    );
    hub.kill9();
    std::fs::remove_dir_all(hub.dir.join("recall")).unwrap();
    hub.spawn();
    let admin = hub.admin();
    assert_eq!(
        texts(&admin, &search("deploy model")).await,
        set(&["the deploy model is k2.5"])
    );

    // Forget, then purge (admin).
    let closed = admin.forget(&v2.id, None, false).await.unwrap().memory;
    assert!(closed.invalid_at.is_some());
    assert!(texts(&admin, &search("deploy model")).await.is_empty());
    let purged = admin.forget(&v2.id, None, true).await.unwrap().memory;
    assert!(purged.purged && purged.text.is_empty());
    assert!(texts(&admin, &all).await.is_empty());
    // Every change is on sys.memory.*.
    let page = admin
        .read_events("sys.memory.>", Some(0), 100, 0)
        .await
        .unwrap();
    let topics: Vec<&str> = page.events.iter().map(|e| e.topic.as_str()).collect();
    assert_eq!(
        topics,
        vec![
            "sys.memory.created",
            "sys.memory.updated",
            "sys.memory.closed",
            "sys.memory.purged"
        ]
    );
    assert!(page.events.iter().all(|e| e.data["id"].is_string()
        && e.data["space"] == "entity:sisters"
        && e.data["seq"].is_i64()));
}

#[tokio::test]
async fn memory_forks_read_the_past_and_promote_by_choice() {
    let hub = Hub::start();
    let admin = hub.admin();
    let (rp, p) = register(&admin, reg("sisters", Role::Primary, Some("main"))).await;
    let write = |text: &str| {
        let mut m = memory("entity:sisters", text);
        m.fence = rp.fence;
        m
    };
    let before = p
        .remember(&write("walrus known before the fork"))
        .await
        .unwrap()
        .memory;
    let mut freq = reg("sisters", Role::Fork, Some("long experiment"));
    freq.forked_from = Some(rp.instance.id.clone());
    let (rf, fork) = register(&admin, freq).await;
    p.remember(&write("walrus learned after the fork"))
        .await
        .unwrap();
    p.forget(&before.id, rp.fence, false).await.unwrap();
    let branch = fork
        .remember(&vis(
            &format!("instance:{}", rf.instance.id),
            "walrus found by the fork",
            "entity",
        ))
        .await
        .unwrap()
        .memory;

    let mut q = search("walrus");
    q.spaces = vec!["entity:sisters".into()];
    // The fork sees canonical as of its fork point plus its branch.
    assert_eq!(
        texts(&fork, &q).await,
        set(&["walrus known before the fork", "walrus found by the fork"])
    );
    // The primary sees canonical now; the branch merged nowhere.
    assert_eq!(texts(&p, &q).await, set(&["walrus learned after the fork"]));

    let d = p.fork_diff(&rf.instance.id).await.unwrap();
    assert_eq!(d.fork_point, rf.instance.fork_point.unwrap());
    assert_eq!(
        d.branch.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        vec![branch.id.clone()]
    );
    assert_eq!(d.canonical_since.len(), 2);

    let e = fork
        .promote(&rf.instance.id, vec![branch.id.clone()], rp.fence)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Fenced);
    let pr = p
        .promote(&rf.instance.id, vec![branch.id.clone()], rp.fence)
        .await
        .unwrap();
    let copy = &pr.promoted[0].memory;
    assert_eq!(
        copy.provenance.promoted_from.as_deref(),
        Some(branch.id.as_str())
    );
    assert_eq!(copy.space, "entity:sisters");
    assert_eq!(
        texts(&p, &q).await,
        set(&["walrus learned after the fork", "walrus found by the fork"])
    );
}

#[tokio::test]
async fn memory_hybrid_recall_ranks_meaning_over_words() {
    let embedder = TestEmbedder::start().await;
    let hub = Hub::start_with(&[
        "--embedder",
        embedder.url.as_str(),
        "--embedder-model",
        "test-bow",
    ]);
    let admin = hub.admin();
    let (_, w) = register(&admin, reg("anvil", Role::Secondary, Some("worker"))).await;
    let target = "kimi provider fails requests around 03:00";
    let distractor = "requests at night drop by the provider desk are paperwork about lunch menus and parking \
                      and the new office chairs and the holiday schedule and the printer toner and the coffee machine";
    let batch = vec![
        memory("shared:providers", distractor),
        memory("shared:providers", target),
        memory(
            "shared:providers",
            "the vendor api is unreliable after midnight",
        ),
        memory(
            "shared:providers",
            "our api vendor has outages every midnight",
        ),
    ];
    w.remember_batch(batch).await.unwrap();
    // Vectors are filled in off the request path, then reach the index.
    eventually(
        Duration::from_secs(30),
        "every memory to have its vector in the index",
        || async {
            let r = w
                .recall(&search("provider drops requests at night"))
                .await
                .ok()?;
            (r.results.len() == 4 && r.results.iter().all(|h| h.explain.vector.is_some()))
                .then_some(())
        },
    )
    .await;
    let r = w
        .recall(&search("provider drops requests at night"))
        .await
        .unwrap();
    assert_eq!(r.mode, "hybrid");
    let first = &r.results[0];
    assert_eq!(first.memory.text, target, "{r:#?}");
    assert!(first.explain.vector.is_some() && first.explain.bm25.is_some());
    // Full text alone would have put the distractor first.
    let d = r
        .results
        .iter()
        .find(|h| h.memory.text == distractor)
        .unwrap();
    assert_eq!(d.explain.bm25_rank, Some(1));
    assert_eq!(first.explain.bm25_rank, Some(2));
    // A caller's own query vector of the wrong dimension is a 400.
    let mut bad = search("x");
    bad.embedding = Some(vec![1.0, 2.0, 3.0]);
    bad.spaces = vec!["shared:providers".into()];
    assert_eq!(
        w.recall(&bad).await.unwrap_err().details["field"],
        "embedding"
    );
    // So is a memory's.
    let mut m = memory("shared:providers", "three dims");
    m.embedding = Some(vec![1.0, 2.0, 3.0]);
    assert_eq!(
        w.remember(&m).await.unwrap_err().details["field"],
        "embedding"
    );
}

#[tokio::test]
async fn memory_embedder_down_loses_nothing() {
    let embedder = TestEmbedder::start().await;
    embedder.down.store(true, Ordering::SeqCst);
    let hub = Hub::start_with(&[
        "--embedder",
        embedder.url.as_str(),
        "--embedder-model",
        "test-bow",
    ]);
    let admin = hub.admin();
    let (_, w) = register(&admin, reg("anvil", Role::Secondary, Some("worker"))).await;
    let m = w
        .remember(&memory("shared:p", "the vendor has outages at midnight"))
        .await
        .unwrap()
        .memory;
    assert_eq!(m.embedding_dim, None);
    let r = w.recall(&search("vendor outages")).await.unwrap();
    assert_eq!(r.mode, "fulltext");
    assert!(r.note.unwrap().contains("full-text"));
    assert_eq!(r.results.len(), 1);
    embedder.down.store(false, Ordering::SeqCst);
    let r = eventually(
        Duration::from_secs(60),
        "the embedding to be filled in and indexed",
        || async {
            let r = w.recall(&search("provider failure")).await.ok()?;
            (r.mode == "hybrid" && r.results.first()?.explain.vector.is_some()).then_some(r)
        },
    )
    .await;
    assert_eq!(
        w.memory(&m.id, false).await.unwrap().memory.embedding_dim,
        Some(DIM as u32)
    );
    assert_eq!(r.results[0].memory.id, m.id);
    assert!(r.results[0].explain.vector.is_some());
}

#[tokio::test]
async fn memory_bad_input_and_write_limit() {
    let hub = Hub::start_with(&["--memory-rate-limit", "3"]);
    let admin = hub.admin();
    let (_, w) = register(&admin, reg("anvil", Role::Secondary, Some("worker"))).await;
    let (_, ghost) = register(&admin, reg("anvil", Role::Secondary, None)).await;
    let field = |e: concord_core::Error| {
        assert_eq!(e.code, ErrorCode::BadRequest, "{e:?}");
        e.details["field"].as_str().unwrap_or("").to_string()
    };
    assert_eq!(
        field(w.remember(&memory("shared:p", "  ")).await.unwrap_err()),
        "text"
    );
    assert_eq!(
        field(
            w.remember(&memory("shared:p", &"a".repeat(64 * 1024 + 1)))
                .await
                .unwrap_err()
        ),
        "text"
    );
    assert_eq!(
        field(w.remember(&memory("team:p", "x")).await.unwrap_err()),
        "space"
    );
    assert_eq!(
        field(
            w.remember(&vis("shared:p", "x", "circle:nope"))
                .await
                .unwrap_err()
        ),
        "visibility"
    );
    let raw: Value = w
        .call::<Value, Value>(
            reqwest::Method::POST,
            "/v1/memories",
            Some(&json!({"space": "shared:p", "text": "x", "embedding": [1.0, 1e39]})),
        )
        .await
        .map_err(field)
        .unwrap_err()
        .into();
    assert_eq!(raw, json!("embedding"));
    let e = w
        .remember_batch(vec![memory("shared:p", "fine"), memory("shared:p", "")])
        .await
        .unwrap_err();
    assert_eq!(field(e), "memories[1].text");
    assert_eq!(
        ghost
            .remember(&memory("shared:p", "ghost"))
            .await
            .unwrap_err()
            .code,
        ErrorCode::Forbidden
    );
    // Nothing of the above was written.
    assert!(admin
        .recall(&search("fine ghost x"))
        .await
        .unwrap()
        .results
        .is_empty());
    // Any query text is safe.
    for q in [
        "NOT (AND) \"* OR:",
        "text:foo^2 ~~ [a TO b]",
        "\u{0}\u{1f600}",
        "-",
        "",
    ] {
        admin
            .recall(&search(q))
            .await
            .unwrap_or_else(|e| panic!("{q:?}: {e}"));
    }
    // The per-writer write limit: 3/s.
    let mut limited = None;
    for i in 0..10 {
        if let Err(e) = w.remember(&memory("shared:p", &format!("note {i}"))).await {
            limited = Some(e);
            break;
        }
    }
    let e = limited.expect("the write limit applies");
    assert_eq!(e.code, ErrorCode::RateLimited);
    assert!(e.details["retry_after_ms"].as_u64().is_some());
}

#[tokio::test]
async fn memory_cli() {
    let hub = Hub::start();
    let out = hub.cli(&[
        "remember",
        "entity:sisters",
        "kimi drops requests at 03:00",
        "--kind",
        "learning",
        "--tags",
        "provider,kimi",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    let id = said.split_whitespace().nth(1).unwrap().to_string();
    assert!(id.starts_with("mem_"), "{said}");
    let out = hub.cli(&["recall", "kimi requests", "--space", "entity:sisters"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains(&id)
            && text.contains("admin")
            && text.contains("ago"),
        "{text}"
    );
    let out = hub.cli(&["memory", "get", &id]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("kimi drops requests"));
    let out = hub.cli(&["memory", "forget", &id]);
    assert!(out.status.success());
    let out = hub.cli(&["memory", "history", &id, "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["history"][0]["invalid_at"].is_string());
}
