//! The systems users would otherwise pick, driven with the same concurrency and
//! payloads as Concord's suites (issue: benchmarks beside the alternatives). Each
//! is a fair, idiomatic use of that system: prepared statements and a pool for
//! PostgreSQL, one connection per worker and pipelining for Redis batches, the
//! etcd JSON gateway's lease keep-alive, NATS core pub/sub. Each returns `None`
//! with a printed reason when its server is not there.
//!
//! Protocols are spoken directly (RESP, the NATS text protocol, etcd's JSON
//! gateway) rather than through client crates: a few dozen lines each, and no
//! heavy dependency trees for a benchmark.

use crate::bench::{load, new_histogram, Report};
use anyhow::{anyhow, Context, Result};
use hdrhistogram::Histogram;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub fn skipped(system: &str, why: impl std::fmt::Display) -> Option<Report> {
    eprintln!("baseline {system}: SKIPPED: {why}");
    None
}

// ---------- PostgreSQL SKIP LOCKED queue ----------

/// A plain PostgreSQL queue: INSERT, `SELECT … FOR UPDATE SKIP LOCKED` + UPDATE
/// to running, UPDATE to completed; `synchronous_commit = on` (fsync per commit,
/// like Concord's default durability). Single items take the shape of Concord's
/// worker loop: the completion of the job held and the next claim are one
/// autocommitted statement.
pub async fn pg_queue(url: &str, conc: usize, secs: u64, batch: usize) -> Option<Report> {
    let system = if batch == 1 {
        "postgres-skip-locked"
    } else {
        "postgres-skip-locked-batch"
    };
    match pg_queue_inner(url, conc, secs, batch).await {
        Ok(r) => Some(r.named(system)),
        Err(e) => skipped(system, e),
    }
}

async fn pg_queue_inner(url: &str, conc: usize, secs: u64, batch: usize) -> Result<Report> {
    let cfg: tokio_postgres::Config = url.parse()?;
    let mgr = deadpool_postgres::Manager::new(cfg, tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(mgr)
        .max_size(conc + 2)
        .build()?;
    let schema = format!("bench_pgq_{}", std::process::id());
    {
        let c = pool.get().await?;
        c.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};
             CREATE TABLE {schema}.jobs (id BIGSERIAL PRIMARY KEY, payload TEXT NOT NULL, state TEXT NOT NULL, result TEXT);
             CREATE INDEX ON {schema}.jobs (id) WHERE state = 'pending';"
        ))
        .await?;
    }
    let payload = "x".repeat(1024);
    let pool = Arc::new(pool);
    let schema2 = schema.clone();
    let cleanup = pool.clone();
    // Each single-item worker's claimed job, completed in its next cycle.
    let held: Arc<Vec<std::sync::Mutex<Option<i64>>>> =
        Arc::new((0..conc.max(1)).map(|_| Default::default()).collect());
    let report = load(conc, secs, move |w| {
        let (pool, payload, schema, held) =
            (pool.clone(), payload.clone(), schema2.clone(), held.clone());
        Box::pin(async move {
            let c = pool.get().await?;
            if batch == 1 {
                // The worker's loop of the Concord suite: enqueue, then one
                // autocommitted statement completes the job held and claims the next.
                let ins = c.prepare_cached(&format!("INSERT INTO {schema}.jobs (payload, state) VALUES ($1, 'pending')")).await?;
                c.execute(&ins, &[&payload]).await?;
                let step = c
                    .prepare_cached(&format!(
                        "WITH done AS (UPDATE {schema}.jobs SET state = 'completed', result = '1' WHERE id = $1 RETURNING id) \
                         UPDATE {schema}.jobs SET state = 'running' WHERE id = (SELECT id FROM {schema}.jobs WHERE state = 'pending' \
                         ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id"
                    ))
                    .await?;
                let mine = held.get(w).ok_or_else(|| anyhow!("no worker {w}"))?;
                let before = mine.lock().map_err(|_| anyhow!("worker state poisoned"))?.take();
                let next = c.query_opt(&step, &[&before.unwrap_or(0)]).await?;
                *mine.lock().map_err(|_| anyhow!("worker state poisoned"))? = next.map(|r| r.get(0));
                Ok(u64::from(before.is_some()))
            } else {
                let payloads: Vec<&str> = (0..batch).map(|_| payload.as_str()).collect();
                let ins = c
                    .prepare_cached(&format!("INSERT INTO {schema}.jobs (payload, state) SELECT p, 'pending' FROM unnest($1::text[]) p"))
                    .await?;
                c.execute(&ins, &[&payloads]).await?;
                let claim = c
                    .prepare_cached(&format!(
                        "UPDATE {schema}.jobs SET state = 'running' WHERE id IN (SELECT id FROM {schema}.jobs WHERE state = 'pending' \
                         ORDER BY id FOR UPDATE SKIP LOCKED LIMIT $1) RETURNING id"
                    ))
                    .await?;
                let ids: Vec<i64> = c.query(&claim, &[&(batch as i64)]).await?.iter().map(|r| r.get(0)).collect();
                let done = c.prepare_cached(&format!("UPDATE {schema}.jobs SET state = 'completed', result = '1' WHERE id = ANY($1)")).await?;
                c.execute(&done, &[&ids]).await?;
                Ok(ids.len() as u64)
            }
        })
    })
    .await;
    // The run's jobs (tens of MB of payloads) must not stay in the user's database.
    let dropped = async {
        cleanup
            .get()
            .await?
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await?;
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let report = report?;
    dropped.map_err(|e| anyhow!("cannot drop the baseline's schema {schema}: {e}"))?;
    Ok(report)
}

// ---------- Redis list queue ----------

/// A minimal RESP client: one connection, commands as arrays of bulk strings.
struct Resp {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Resp {
    async fn connect(addr: &str) -> Result<Resp> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(Resp {
            r: BufReader::new(r),
            w,
        })
    }
    fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
    }
    /// Reads one reply; returns a bulk string's bytes, if any.
    async fn reply(&mut self) -> Result<Option<Vec<u8>>> {
        let mut line = String::new();
        self.r.read_line(&mut line).await?;
        let (kind, rest) = line.split_at(1);
        let rest = rest.trim_end();
        match kind {
            "+" | ":" => Ok(None),
            "-" => Err(anyhow!("redis: {rest}")),
            "$" => {
                let n: i64 = rest.parse()?;
                if n < 0 {
                    return Ok(None);
                }
                let mut buf = vec![0u8; n as usize + 2];
                self.r.read_exact(&mut buf).await?;
                buf.truncate(n as usize);
                Ok(Some(buf))
            }
            other => Err(anyhow!("redis: unexpected reply {other:?}")),
        }
    }
    /// Sends the commands in one write (pipelined) and reads every reply.
    async fn pipeline(&mut self, cmds: &[Vec<&[u8]>]) -> Result<Vec<Option<Vec<u8>>>> {
        let mut out = Vec::new();
        for c in cmds {
            Resp::encode(&mut out, c);
        }
        self.w.write_all(&out).await?;
        let mut replies = Vec::with_capacity(cmds.len());
        for _ in cmds {
            replies.push(self.reply().await?);
        }
        Ok(replies)
    }
}

/// A Redis list queue: RPUSH, LMOVE to a processing list, LREM when done (single
/// items: the LREM of the item held and the next LMOVE pipelined, as Concord's
/// worker loop completes and claims in one call).
/// Not durable by default (this server keeps nothing on disk).
pub async fn redis_queue(addr: &str, conc: usize, secs: u64, batch: usize) -> Option<Report> {
    let system = if batch == 1 {
        "redis-list"
    } else {
        "redis-list-batch"
    };
    if let Err(e) = Resp::connect(addr).await {
        return skipped(system, format!("no Redis at {addr}: {e}"));
    }
    let key = format!("bench:q:{}", std::process::id());
    let payload: Arc<Vec<u8>> = Arc::new((0..1024).map(|i| b'a' + (i % 26) as u8).collect());
    let addr = addr.to_string();
    // Each single-item worker's item in the processing list, removed in its next cycle.
    let held: Arc<Vec<std::sync::Mutex<Option<Vec<u8>>>>> =
        Arc::new((0..conc.max(1)).map(|_| Default::default()).collect());
    let r = load(conc, secs, move |w| {
        let (addr, key, payload, held) = (addr.clone(), key.clone(), payload.clone(), held.clone());
        Box::pin(async move {
            // A connection per call would be unfair; keep one per worker.
            let mut c = REDIS.with_conn(w, &addr).await?;
            let proc_key = format!("{key}:processing");
            let push: Vec<Vec<&[u8]>> = (0..batch)
                .map(|_| vec![&b"RPUSH"[..], key.as_bytes(), &payload[..]])
                .collect();
            c.pipeline(&push).await?;
            let mv: Vec<&[u8]> = vec![
                &b"LMOVE"[..],
                key.as_bytes(),
                proc_key.as_bytes(),
                b"LEFT",
                b"RIGHT",
            ];
            if batch == 1 {
                // Concord's worker loop: one round trip removes the item held
                // from the processing list and moves the next one there.
                let mine = held.get(w).ok_or_else(|| anyhow!("no worker {w}"))?;
                let before = mine
                    .lock()
                    .map_err(|_| anyhow!("worker state poisoned"))?
                    .take();
                let mut step = Vec::new();
                if let Some(item) = &before {
                    step.push(vec![&b"LREM"[..], proc_key.as_bytes(), b"1", &item[..]]);
                }
                step.push(mv.clone());
                let next = c.pipeline(&step).await?.pop().flatten();
                *mine.lock().map_err(|_| anyhow!("worker state poisoned"))? = next;
                REDIS.put(w, c);
                return Ok(u64::from(before.is_some()));
            }
            let moves: Vec<Vec<&[u8]>> = (0..batch).map(|_| mv.clone()).collect();
            let got = c.pipeline(&moves).await?;
            let items: Vec<Vec<u8>> = got.into_iter().flatten().collect();
            let rem: Vec<Vec<&[u8]>> = items
                .iter()
                .map(|it| vec![&b"LREM"[..], proc_key.as_bytes(), b"1", &it[..]])
                .collect();
            if !rem.is_empty() {
                c.pipeline(&rem).await?;
            }
            REDIS.put(w, c);
            Ok(items.len() as u64)
        })
    })
    .await;
    match r {
        Ok(r) => Some(r.named(system)),
        Err(e) => skipped(system, e),
    }
}

/// One RESP connection per worker, kept between iterations.
struct RedisConns(std::sync::Mutex<std::collections::HashMap<usize, Resp>>);
static REDIS: std::sync::LazyLock<RedisConns> =
    std::sync::LazyLock::new(|| RedisConns(Default::default()));

impl RedisConns {
    async fn with_conn(&self, w: usize, addr: &str) -> Result<Resp> {
        let existing = self.0.lock().ok().and_then(|mut m| m.remove(&w));
        match existing {
            Some(c) => Ok(c),
            None => Resp::connect(addr).await,
        }
    }
    fn put(&self, w: usize, c: Resp) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(w, c);
        }
    }
}

// ---------- etcd lease keep-alives ----------

/// A throwaway etcd on loopback, killed when dropped.
pub struct Etcd {
    child: tokio::process::Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    pub async fn start() -> Result<Etcd> {
        let bin = ["etcd", "/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .find(|b| {
                std::process::Command::new(b)
                    .arg("--version")
                    .output()
                    .is_ok()
            })
            .ok_or_else(|| anyhow!("no etcd binary (apt-get install etcd-server)"))?;
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let peer = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let child = tokio::process::Command::new(bin)
            .arg("--data-dir")
            .arg(dir.path())
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer}"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting etcd")?;
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if http
                .get(format!("{url}/health"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(Etcd {
                    child,
                    url,
                    _dir: dir,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(anyhow!("etcd did not become healthy"))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Keep-alives for `n` etcd leases through etcd's JSON gateway (/v3/lease/keepalive).
pub async fn etcd_heartbeat(n: usize, conc: usize, secs: u64) -> Option<Report> {
    let etcd = match Etcd::start().await {
        Ok(e) => e,
        Err(e) => return skipped("etcd", e),
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(conc)
        .build()
        .ok()?;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let r: serde_json::Value = match http
            .post(format!("{}/v3/lease/grant", etcd.url))
            .json(&serde_json::json!({"TTL": 15}))
            .send()
            .await
        {
            Ok(r) => r.json().await.ok()?,
            Err(e) => return skipped("etcd", e),
        };
        ids.push(
            r["ID"]
                .as_str()
                .map(str::to_string)
                .or_else(|| r["ID"].as_i64().map(|i| i.to_string()))?,
        );
    }
    let ids = Arc::new(ids);
    let url = etcd.url.clone();
    let r = load(conc, secs, move |w| {
        let (http, ids, url) = (http.clone(), ids.clone(), url.clone());
        Box::pin(async move {
            let k = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let id = &ids[(w + k) % ids.len()];
            let resp = http
                .post(format!("{url}/v3/lease/keepalive"))
                .json(&serde_json::json!({"ID": id}))
                .send()
                .await?;
            resp.bytes().await?;
            Ok(1)
        })
    })
    .await;
    drop(etcd);
    match r {
        Ok(r) => Some(r.named("etcd")),
        Err(e) => skipped("etcd", e),
    }
}

static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// ---------- NATS core pub/sub ----------

/// Publish at `rate` per second to `subs` subscribers; latency from publish to
/// each delivery. Timestamps ride in the payload.
pub async fn nats_events(addr: &str, subs: usize, rate: u64, secs: u64) -> Option<Report> {
    match nats_inner(addr, subs, rate, secs).await {
        Ok(r) => Some(r.named("nats")),
        Err(e) => skipped("nats", e),
    }
}

async fn nats_connect(
    addr: &str,
) -> Result<(
    BufReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
)> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut info = String::new();
    r.read_line(&mut info).await?;
    w.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
        .await?;
    Ok((r, w))
}

async fn nats_inner(addr: &str, subs: usize, rate: u64, secs: u64) -> Result<Report> {
    let epoch = Instant::now();
    let subject = format!("bench.{}", std::process::id());
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..subs {
        let (mut r, mut w) = nats_connect(addr).await?;
        w.write_all(format!("SUB {subject} {i}\r\nPING\r\n").as_bytes())
            .await?;
        let mut pong = String::new();
        while !pong.starts_with("PONG") {
            pong.clear();
            r.read_line(&mut pong).await?;
        }
        let measuring = measuring.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = new_histogram();
            let mut line = String::new();
            let _w = w;
            loop {
                line.clear();
                match tokio::time::timeout(Duration::from_secs(2), r.read_line(&mut line)).await {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(_)) => {}
                }
                if line.starts_with("PING") {
                    continue;
                }
                if let Some(rest) = line.strip_prefix("MSG ") {
                    let n: usize = rest
                        .split_whitespace()
                        .last()
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(0);
                    let mut buf = vec![0u8; n + 2];
                    if r.read_exact(&mut buf).await.is_err() {
                        break;
                    }
                    let sent: u64 = std::str::from_utf8(&buf[..n])
                        .ok()
                        .and_then(|s| s.split(':').next()?.parse().ok())
                        .unwrap_or(0);
                    if measuring.load(std::sync::atomic::Ordering::Relaxed) {
                        let now = epoch.elapsed().as_micros() as u64;
                        let _ = hist.record(now.saturating_sub(sent).max(1));
                    }
                }
            }
            hist
        }));
    }
    let (_pr, mut pw) = nats_connect(addr).await?;
    let pad = "x".repeat(200);
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = Instant::now();
    let mut next = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(secs + 1) {
        if start.elapsed() >= Duration::from_secs(1) {
            measuring.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let body = format!("{}:{pad}", epoch.elapsed().as_micros());
        pw.write_all(format!("PUB {subject} {}\r\n{body}\r\n", body.len()).as_bytes())
            .await?;
        sent += 1;
        next += interval;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            tokio::time::sleep(d).await;
        }
    }
    measuring.store(false, std::sync::atomic::Ordering::Relaxed);
    drop(pw);
    let mut hist = new_histogram();
    for t in tasks {
        hist.add(&t.await?)?;
    }
    let _ = sent;
    Ok(Report::from_hist(
        "events",
        "nats",
        subs,
        secs as f64,
        &hist,
        0,
        hist.len() as f64 / secs as f64,
    ))
}

// ---------- the HTTP ceiling ----------

/// A bare axum handler that echoes the body: what the same load generator gets
/// from HTTP alone on this machine.
pub async fn http_ceiling(conc: usize, secs: u64) -> Result<Report> {
    let app = axum::Router::new().route(
        "/echo",
        axum::routing::post(|body: axum::body::Bytes| async move { body }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/echo", listener.local_addr()?);
    // TCP_NODELAY as the hub sets it, so the ceiling is measured the same way.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(conc)
        .build()?;
    let body = Arc::new(format!("{{\"blob\":\"{}\"}}", "x".repeat(1000)));
    // Parsed once, as Concord's client does with its hub URLs.
    let url = reqwest::Url::parse(&url)?;
    let r = load(conc, secs, move |_| {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        Box::pin(async move {
            let resp = http
                .post(url)
                .body(body.to_string())
                .header("content-type", "application/json")
                .send()
                .await?;
            resp.bytes().await?;
            Ok(1)
        })
    })
    .await?;
    server.abort();
    Ok(r.named("axum-echo"))
}

// ---------- the disk ----------

/// What one durable write costs this machine's disk: a 4 KiB append and
/// `fdatasync`, one after another, on the file system the benchmarks' hubs keep
/// their data on. Every acknowledged write of `--durability full` waits for one
/// such flush (shared by its group commit), so this bounds the latency of a
/// single call, and a slow day's disk shows here rather than as a mystery in
/// the queue and events figures.
pub async fn disk_fsync(secs: u64) -> Result<Report> {
    let secs = secs.clamp(1, 3);
    let hist = tokio::task::spawn_blocking(move || -> Result<Histogram<u64>> {
        use std::io::Write;
        let dir = tempfile::tempdir()?;
        let mut f = std::fs::File::create(dir.path().join("fsync.probe"))?;
        let page = [0x5au8; 4096];
        let mut hist = new_histogram();
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            let t = Instant::now();
            f.write_all(&page)?;
            f.sync_data()?;
            hist.record(t.elapsed().as_micros().max(1) as u64)?;
        }
        Ok(hist)
    })
    .await??;
    let n = hist.len();
    Ok(Report::from_hist(
        "disk-fsync",
        "4k-append-fdatasync",
        1,
        secs as f64,
        &hist,
        0,
        n as f64 / secs as f64,
    ))
}

// ---------- SQLite FTS5 over the same memories ----------

/// SQLite's own full-text search (FTS5, BM25 `rank`) over the texts of the same
/// corpus Concord's recall suite ingests, queried with the same query texts (words
/// OR-ed, as Concord's recall treats them), top 10, one read connection per worker
/// on a blocking thread. It applies no visibility filter, so it does less work
/// per query than Concord's recall.
pub async fn sqlite_fts5(memories: usize, conc: usize, secs: u64) -> Option<Report> {
    match sqlite_fts5_inner(memories, conc, secs).await {
        Ok(r) => Some(r.named("sqlite-fts5")),
        Err(e) => skipped("sqlite-fts5", e),
    }
}

async fn sqlite_fts5_inner(memories: usize, conc: usize, secs: u64) -> Result<Report> {
    use crate::bench_memory::Corpus;
    use rand::{rngs::StdRng, SeedableRng};
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("fts.db");
    let corpus = Arc::new(Corpus::new());
    {
        let (path, corpus) = (path.clone(), corpus.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mut db = rusqlite::Connection::open(&path)?;
            db.execute_batch(
                "PRAGMA journal_mode = WAL; CREATE VIRTUAL TABLE fts USING fts5(text);",
            )?;
            let tx = db.transaction()?;
            {
                let mut ins = tx.prepare("INSERT INTO fts (rowid, text) VALUES (?1, ?2)")?;
                for i in 0..memories {
                    let m = corpus.memory(i, 8);
                    ins.execute(rusqlite::params![i as i64 + 1, m.text])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await??;
    }
    type Worker = Arc<std::sync::Mutex<(rusqlite::Connection, StdRng)>>;
    let mut workers: Vec<Worker> = Vec::with_capacity(conc.max(1));
    for w in 0..conc.max(1) {
        let db = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        workers.push(Arc::new(std::sync::Mutex::new((
            db,
            StdRng::seed_from_u64(w as u64),
        ))));
    }
    let workers = Arc::new(workers);
    let report = load(conc, secs, move |w| {
        let (slot, corpus) = (workers[w].clone(), corpus.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || -> Result<u64> {
                let mut guard = slot.lock().map_err(|_| anyhow!("worker poisoned"))?;
                let (db, rng) = &mut *guard;
                let (text, _) = corpus.query(rng);
                let expr = text
                    .split_whitespace()
                    .map(|w| format!("\"{w}\""))
                    .collect::<Vec<_>>()
                    .join(" OR ");
                let mut q = db.prepare_cached(
                    "SELECT rowid FROM fts WHERE fts MATCH ?1 ORDER BY rank LIMIT 10",
                )?;
                let hits = q.query_map([expr], |r| r.get::<_, i64>(0))?.count();
                std::hint::black_box(hits);
                Ok(1)
            })
            .await?
        })
    })
    .await?;
    drop(dir);
    Ok(report)
}
