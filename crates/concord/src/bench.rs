//! `concord bench`: load generators measured with HDR histograms.
//! A benchmark, never a test: figures are reported, not asserted.

use anyhow::{anyhow, Result};
use clap::{Args, ValueEnum};
use concord_client::Client;
use concord_core::api::RegisterInstanceRequest;
use concord_core::token::{generate_secret, hash_secret};
use concord_server::{Hub, HubConfig};
use concord_store::DynStore;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum Suite {
    /// Heartbeats from many live instances (DESIGN §10: ≥ 20,000/s, p99 < 5 ms for 10,000).
    Heartbeat,
    /// Enqueue, claim, complete with single-item calls, 1 KiB payloads (≥ 10,000 tasks/s):
    /// a worker enqueues, then completes its task and claims the next in one call.
    Queue,
    /// The same cycle with batch calls of 100 (≥ 50,000 tasks/s).
    QueueBatch,
    /// Publish → SSE delivery to 100 subscribers at 5,000 events/s (p99 < 5 ms).
    Events,
    /// A multi dispatch to 10 peers that answer at once (overhead p99 < 10 ms).
    Dispatch,
    /// Memory ingest with 384-d vectors through the batch endpoint (≥ 5,000/s).
    Ingest,
    /// Recall over `--memories` memories: full-text p99 < 10 ms, hybrid p99 < 20 ms,
    /// recall@10 ≥ 0.95 against exact search.
    Recall,
    /// A fresh embedded hub's start time and resident size when idle (start < 200 ms,
    /// RSS < 30 MiB).
    Idle,
    /// Every suite above, each with its baselines.
    All,
}

#[derive(Args, Clone)]
pub struct BenchArgs {
    #[arg(value_enum)]
    suite: Suite,
    /// Benchmark a running hub instead of starting an embedded one.
    #[arg(long)]
    hub: Option<String>,
    /// Admin token for --hub.
    #[arg(long, env = "CONCORD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Start the embedded hub on this PostgreSQL database instead of SQLite.
    #[arg(long)]
    database: Option<String>,
    /// Seconds to measure (after a warm-up of 1 s).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Concurrent clients. Default per suite: 16 workers for the queue suites (the
    /// figure DESIGN §10 budgets), 4 clients for recall (a latency budget, not a
    /// saturation test: at 64 clients on 2 cores p99 is mostly queueing), 64 otherwise.
    #[arg(long = "concurrency")]
    concurrency_arg: Option<usize>,
    /// The concurrency of the suite being run (from `--concurrency` or its default).
    #[arg(skip)]
    concurrency: usize,
    /// Live instances (heartbeat suite); ignored by the others.
    #[arg(long, default_value_t = 10_000)]
    instances: usize,
    /// Memories to ingest (ingest and recall suites).
    #[arg(long, default_value_t = 100_000)]
    memories: usize,
    /// Memories per batch call (ingest and recall suites).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Ingest without vectors (full-text only).
    #[arg(long)]
    no_vectors: bool,
    /// Durability of the embedded SQLite hub: full (fsync every group commit) or normal.
    #[arg(long, value_enum, default_value = "full")]
    durability: crate::serve::DurabilityArg,
    /// Print one JSON object instead of lines.
    #[arg(long)]
    json: bool,
    /// Skip the baselines (PostgreSQL, Redis, etcd, NATS, bare HTTP).
    #[arg(long)]
    no_baselines: bool,
    /// PostgreSQL for the SKIP LOCKED baseline.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    baseline_postgres: String,
    #[arg(long, default_value = "127.0.0.1:6379")]
    baseline_redis: String,
    #[arg(long, default_value = "127.0.0.1:4222")]
    baseline_nats: String,
    /// Repeat everything this many times; the report gives medians and spread.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Write a Markdown report (and an SVG chart beside it) to this path.
    #[arg(long)]
    markdown: Option<std::path::PathBuf>,
}

#[derive(Serialize, Clone, Debug)]
pub struct Report {
    pub suite: String,
    /// `concord` or the baseline system's name.
    pub system: String,
    pub backend: String,
    pub instances: usize,
    pub concurrency: usize,
    pub duration_s: f64,
    pub operations: u64,
    pub errors: u64,
    pub throughput_per_s: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The first error of each kind (code and message), so that a run with
    /// errors says what they were.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub error_kinds: Vec<String>,
    /// Heartbeat suite: the store round trips the hub made during the measured
    /// window (from its /metrics), durable lease writes and token lookups the
    /// auth cache could not answer. Every other heartbeat was answered from memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub durable_writes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_lookups: Option<u64>,
    /// Suite-specific figures (the memory suites).
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}

/// The hub's `/metrics` text.
async fn hub_metrics(url: &str) -> Result<String> {
    Ok(reqwest::get(format!("{url}/metrics")).await?.text().await?)
}

/// The value of the unlabelled metric `name` in `/metrics` text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The hub's counters that tell how many heartbeats reached the store.
async fn store_counters(url: &str) -> Result<(u64, u64)> {
    let text = hub_metrics(url).await?;
    let counter = |name: &str| metric(&text, name).unwrap_or(0.0) as u64;
    Ok((
        counter("concord_heartbeats_durable_total"),
        counter("concord_token_lookups_total"),
    ))
}

/// A hub started in-process on a temp dir, stopped when dropped.
///
/// It runs on a runtime of its own, with as many workers as `concord serve` has.
/// A deployed hub is a process of its own, and so is every baseline's server
/// (PostgreSQL, Redis, etcd, NATS); on the load generator's runtime the hub's
/// connections queued behind the clients' tasks on the same two workers, which cost
/// the queue suite 13% against a hub in its own process. Keeping it in-process
/// (rather than spawning `concord serve`) lets the memory suites read its recall
/// index for the exact-search baseline.
struct Embedded {
    url: String,
    admin: String,
    backend: &'static str,
    /// The hub's state: the memory suites read its recall index directly for the
    /// exact-search baseline of recall@10.
    state: Arc<concord_server::AppState>,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// On PostgreSQL: the database and the schema made for this run.
    pg: Option<(String, String)>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Embedded {
    /// Stops the hub and removes what the run left in the database.
    async fn finish(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(served) = self.served.take() {
            let _ = served.await;
        }
        if let Some((url, schema)) = self.pg.take() {
            concord_store::postgres::drop_schema(&url, &schema)
                .await
                .map_err(|e| anyhow!("cannot drop the bench schema {schema}: {e}"))?;
        }
        Ok(())
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // Dropping a runtime blocks, which an async caller may not do.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn embedded(
    database: Option<&str>,
    durability: crate::serve::DurabilityArg,
) -> Result<Embedded> {
    let dir = tempfile::tempdir()?;
    // A schema per suite run: each run starts from an empty store.
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let pg = database.map(|url| {
        let n = RUNS.fetch_add(1, Ordering::Relaxed);
        (url.to_string(), format!("bench_{}_{n}", std::process::id()))
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("concord-hub")
        .enable_all()
        .build()?;
    let (path, pg_at) = (dir.path().join("concord.db"), pg.clone());
    // Everything the hub spawns (its connections, reaper, pool tasks) must land on
    // its own runtime, so it is started from a task there.
    let started = runtime.spawn(async move {
        let store: DynStore = match &pg_at {
            Some((url, schema)) => Arc::new(
                concord_store::postgres::PostgresStore::connect(url, Some(schema))
                    .await
                    .map_err(|e| anyhow!("{e}"))?,
            ),
            None => Arc::new(
                concord_store::sqlite::SqliteStore::open(
                    &path,
                    match durability {
                        crate::serve::DurabilityArg::Full => {
                            concord_store::sqlite::Durability::Full
                        }
                        crate::serve::DurabilityArg::Normal => {
                            concord_store::sqlite::Durability::Normal
                        }
                    },
                )
                .map_err(|e| anyhow!("{e}"))?,
            ),
        };
        let admin = generate_secret();
        store
            .bootstrap_admin(&hash_secret(&admin), false)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let backend = store.backend();
        let hub = Hub::start(
            store,
            HubConfig {
                rate_limit_per_s: 0,
                ..HubConfig::default()
            },
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
        let state = hub.state();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, rx) = tokio::sync::oneshot::channel();
        let served = tokio::spawn(hub.serve(listener, async move {
            let _ = rx.await;
        }));
        Ok::<_, anyhow::Error>((url, admin, backend, state, stop, served))
    });
    let started = started
        .await
        .unwrap_or_else(|e| Err(anyhow!("the embedded hub did not start: {e}")));
    let (url, admin, backend, state, stop, served) = match started {
        Ok(started) => started,
        Err(e) => {
            // Dropping a runtime blocks, which an async caller may not do.
            runtime.shutdown_background();
            return Err(e);
        }
    };
    Ok(Embedded {
        url,
        admin,
        backend,
        state,
        _dir: dir,
        stop: Some(stop),
        served: Some(served),
        pg,
        runtime: Some(runtime),
    })
}

pub async fn run(args: BenchArgs) -> Result<()> {
    let suites = match args.suite {
        Suite::All => vec![
            Suite::Idle,
            Suite::Heartbeat,
            Suite::Queue,
            Suite::QueueBatch,
            Suite::Events,
            Suite::Dispatch,
            Suite::Ingest,
            Suite::Recall,
        ],
        s => vec![s],
    };
    let mut reports: Vec<Report> = Vec::new();
    for run in 0..args.runs.max(1) {
        for &suite in &suites {
            eprintln!("bench: run {} of {}: {suite:?}", run + 1, args.runs.max(1));
            let args = args.for_suite(suite);
            let r = match suite {
                Suite::Idle if args.hub.is_some() => {
                    eprintln!("bench: idle skipped: it measures a hub it starts itself, not --hub");
                    continue;
                }
                Suite::Idle => crate::bench_idle::measure(args.duration).await?,
                _ => concord_suite(&args, suite).await?,
            };
            print_report(&args, &r)?;
            reports.push(r);
            if !args.no_baselines {
                for b in baselines(&args, suite).await {
                    print_report(&args, &b)?;
                    reports.push(b);
                }
            }
        }
        if !args.no_baselines
            && suites
                .iter()
                .any(|s| matches!(s, Suite::Queue | Suite::Heartbeat))
        {
            let c = crate::baselines::http_ceiling(
                args.for_suite(Suite::Heartbeat).concurrency,
                args.duration,
            )
            .await?;
            let c = Report {
                suite: "http-ceiling".into(),
                ..c
            };
            print_report(&args, &c)?;
            reports.push(c);
        }
        if !args.no_baselines
            && args.hub.is_none()
            && suites
                .iter()
                .any(|s| matches!(s, Suite::Queue | Suite::QueueBatch | Suite::Events))
        {
            let d = crate::baselines::disk_fsync(args.duration).await?;
            print_report(&args, &d)?;
            reports.push(d);
        }
    }
    if let Some(path) = &args.markdown {
        crate::bench_report::write(path, &reports, &args_line(&args))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

impl BenchArgs {
    /// These arguments with the suite's concurrency resolved.
    fn for_suite(&self, suite: Suite) -> BenchArgs {
        let default = match suite {
            Suite::Queue | Suite::QueueBatch => 16,
            Suite::Recall => 4,
            _ => 64,
        };
        BenchArgs {
            concurrency: self.concurrency_arg.unwrap_or(default),
            ..self.clone()
        }
    }
}

fn args_line(a: &BenchArgs) -> String {
    let conc = match a.concurrency_arg {
        Some(c) => format!(" --concurrency {c}"),
        None => String::new(),
    };
    format!(
        "--duration {}{conc} --instances {} --runs {}",
        a.duration, a.instances, a.runs
    )
}

fn print_report(args: &BenchArgs, r: &Report) -> Result<()> {
    if args.json {
        println!("{}", serde_json::to_string(r)?);
    } else if r.suite == "idle" {
        let f = |k: &str| r.extra.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        println!(
            "{:<16} {:<28} start {:.1} ms, first answer {:.1} ms; RSS {:.1} MiB after {:.0} s idle (peak {:.1} MiB)",
            r.suite, format!("{} {}", r.system, r.backend), f("start_ms"), f("first_answer_ms"),
            f("rss_mib"), f("settle_s"), f("peak_rss_mib")
        );
    } else {
        println!(
            "{:<16} {:<28} {:>10.0}/s  p50 {:>7.3}  p95 {:>7.3}  p99 {:>7.3}  max {:>8.3} ms  (n={}, errors={})",
            r.suite, format!("{} {}", r.system, r.backend), r.throughput_per_s, r.p50_ms, r.p95_ms, r.p99_ms, r.max_ms,
            r.operations, r.errors
        );
        if let (Some(d), Some(t)) = (r.durable_writes, r.token_lookups) {
            println!(
                "{:<16} store round trips: {d} durable lease writes, {t} token lookups",
                ""
            );
        }
        if let Some(w) = r.extra.get("store_writes").filter(|w| w.is_object()) {
            let f = |k: &str| w.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
            println!(
                "{:<16} store writer: busy {:.0}% of the time, {:.0} commits/s, {:.1} operations and {:.3} ms per commit",
                "",
                100.0 * f("busy_fraction"),
                f("commits_per_s"),
                f("operations_per_commit"),
                f("commit_ms")
            );
        }
        for k in &r.error_kinds {
            println!("{:<16} error: {k}", "");
        }
    }
    Ok(())
}

async fn concord_suite(args: &BenchArgs, suite: Suite) -> Result<Report> {
    let (guard, url, admin, backend) = match &args.hub {
        Some(url) => {
            let token = args
                .token
                .clone()
                .ok_or_else(|| anyhow!("--hub needs --token (an admin token)"))?;
            (None, url.clone(), token, "remote")
        }
        None => {
            let e = embedded(args.database.as_deref(), args.durability).await?;
            let (u, a, b) = (e.url.clone(), e.admin.clone(), e.backend);
            (Some(e), u, a, b)
        }
    };
    let r = async {
        let client =
            Client::new(vec![url.clone()], Some(admin.clone())).map_err(|e| anyhow!("{e}"))?;
        match suite {
            Suite::Heartbeat => heartbeat(&client, &url, args, backend).await,
            Suite::Queue => queue(&client, args, backend, 1).await,
            Suite::QueueBatch => queue(&client, args, backend, 100).await,
            Suite::Events => events(&client, &url, &admin, args).await,
            Suite::Dispatch => dispatch(&client, args).await,
            Suite::Ingest | Suite::Recall => {
                let index = guard.as_ref().map(|g| g.state.memory.index.clone());
                memory(&client, args, suite, backend, index).await
            }
            Suite::Idle | Suite::All => Err(anyhow!("{suite:?} does not run on a started hub")),
        }
    }
    .await;
    // Clean up (the PostgreSQL schema of the run) whether or not it succeeded.
    if let Some(g) = guard {
        g.finish().await?;
    }
    let mut r = r?;
    r.backend = backend.into();
    r.system = "concord".into();
    Ok(r)
}

async fn baselines(args: &BenchArgs, suite: Suite) -> Vec<Report> {
    use crate::baselines as b;
    let (c, d) = (args.concurrency, args.duration);
    let found = match suite {
        Suite::Queue => vec![
            concord_on_postgres(args, suite).await,
            b::pg_queue(&args.baseline_postgres, c, d, 1).await,
            b::redis_queue(&args.baseline_redis, c, d, 1).await,
        ],
        Suite::QueueBatch => {
            vec![
                concord_on_postgres(args, suite).await,
                b::pg_queue(&args.baseline_postgres, c, d, 100).await,
                b::redis_queue(&args.baseline_redis, c, d, 100).await,
            ]
        }
        Suite::Heartbeat => vec![b::etcd_heartbeat(args.instances, c, d).await],
        Suite::Events => {
            vec![b::nats_events(&args.baseline_nats, EVENT_SUBSCRIBERS, EVENT_RATE, d).await]
        }
        Suite::Recall => vec![b::sqlite_fts5(args.memories, c, d).await],
        _ => vec![],
    };
    let suite_name = match suite {
        Suite::Queue => "queue",
        Suite::QueueBatch => "queue-batch-100",
        Suite::Heartbeat => "heartbeat",
        Suite::Events => "events",
        Suite::Recall => "recall",
        _ => "",
    };
    found
        .into_iter()
        .flatten()
        .map(|r| Report {
            suite: suite_name.into(),
            ..r
        })
        .collect()
}

/// The same suite on an embedded hub whose store is the baseline's PostgreSQL
/// (the backend of a fleet with several hub replicas), beside the plain queue on
/// that database; only when the main run is an embedded SQLite hub.
async fn concord_on_postgres(args: &BenchArgs, suite: Suite) -> Option<Report> {
    const SYSTEM: &str = "concord-postgres";
    if args.hub.is_some() || args.database.is_some() {
        return None;
    }
    let on_pg = BenchArgs {
        database: Some(args.baseline_postgres.clone()),
        ..args.clone()
    };
    match concord_suite(&on_pg, suite).await {
        Ok(r) => Some(r.named(SYSTEM)),
        Err(e) => crate::baselines::skipped(SYSTEM, e),
    }
}

pub const EVENT_SUBSCRIBERS: usize = 100;
pub const EVENT_RATE: u64 = 5_000;

/// Publish → SSE delivery latency to 100 subscribers at 5,000 events/s.
async fn events(admin: &Client, url: &str, token: &str, args: &BenchArgs) -> Result<Report> {
    let epoch = Instant::now();
    let topic = format!("bench.ev{}", std::process::id());
    let start = admin
        .status()
        .await
        .map_err(|e| anyhow!("{e}"))?
        .last_event_seq;
    // Subscribers stop when told (after the last publish has had time to arrive),
    // not by a timeout per event: arming a timer per delivery was a visible part
    // of the load generator's own cost.
    let (stop_subs, stopped) = tokio::sync::watch::channel(false);
    let mut subs = Vec::new();
    let http = reqwest::Client::new();
    for _ in 0..EVENT_SUBSCRIBERS {
        let resp = http
            .get(format!(
                "{url}/v1/events/stream?topics={topic}&from={start}"
            ))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?;
        subs.push(tokio::spawn(sse_subscriber(resp, stopped.clone(), epoch)));
    }
    // Many publishers, each paced: a publish is acknowledged after its commit's
    // fsync, so the offered rate needs rate × commit latency calls in flight
    // (5,000/s × a few ms). With 8 publishers the rate fell short and the suite
    // measured a lighter load than the budget's.
    let publishers = 50u64;
    let per = EVENT_RATE / publishers;
    let secs = args.duration.max(1);
    let mut pubs = Vec::new();
    for _ in 0..publishers {
        let (admin, topic) = (admin.clone(), topic.clone());
        pubs.push(tokio::spawn(async move {
            let interval = Duration::from_nanos(1_000_000_000 / per.max(1));
            let t0 = Instant::now();
            let mut next = Instant::now();
            let mut errors = 0u64;
            let mut acked = new_histogram();
            while t0.elapsed() < Duration::from_secs(secs + 1) {
                let measured = t0.elapsed() >= Duration::from_secs(1);
                let sent = Instant::now();
                let data = serde_json::json!({
                    "t": epoch.elapsed().as_micros() as u64,
                    "m": measured,
                    "pad": "x".repeat(200),
                });
                if admin.publish(&topic, data).await.is_err() {
                    errors += 1;
                } else if measured {
                    let _ = acked.record(sent.elapsed().as_micros().max(1) as u64);
                }
                next += interval;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(d).await;
                }
            }
            (errors, acked)
        }));
    }
    let mut errors = 0;
    // How long a publish took to be acknowledged (durable): the part of the
    // delivery latency spent before fan-out.
    let mut acked = new_histogram();
    for p in pubs {
        let (e, h) = p.await?;
        errors += e;
        acked.add(&h).map_err(|e| anyhow!("{e}"))?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop_subs.send(true);
    let mut hist = new_histogram();
    for s in subs {
        hist.add(&s.await?).map_err(|e| anyhow!("{e}"))?;
    }
    let deliveries = hist.len() as f64 / secs as f64;
    let ms = |q: f64| acked.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        extra: serde_json::json!({
            "publish_acked_ms": {"p50": ms(0.5), "p99": ms(0.99), "max": acked.max() as f64 / 1000.0},
            "published_per_s": acked.len() as f64 / secs as f64,
        }),
        ..Report::from_hist(
            "events",
            "concord",
            EVENT_SUBSCRIBERS,
            secs as f64,
            &hist,
            errors,
            deliveries,
        )
    })
}

/// One subscriber of the events suite: reads the SSE stream's bytes, splits the
/// frames and takes each measured event's send time out of its data, stopping
/// when told. As lean as the NATS baseline's subscriber (which reads the message
/// line and the time prefix), so the load generator's share of the two cores
/// does not weigh on one system more than the other; decoding every event into
/// a typed value here cost more CPU than the hub's fan-out.
async fn sse_subscriber(
    mut resp: reqwest::Response,
    mut stopped: tokio::sync::watch::Receiver<bool>,
    epoch: Instant,
) -> Histogram<u64> {
    let mut hist = new_histogram();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = tokio::select! {
            biased;
            _ = stopped.changed() => break,
            c = resp.chunk() => match c {
                Ok(Some(c)) => c,
                _ => break,
            },
        };
        buf.extend_from_slice(&chunk);
        let mut read = 0;
        while let Some(end) = memchr::memmem::find(&buf[read..], b"\n\n") {
            let frame = &buf[read..read + end];
            read += end + 2;
            // Counted by when it was sent, so a late delivery of a measured event
            // is counted too.
            if memchr::memmem::find(frame, b"\"m\":true").is_none() {
                continue;
            }
            if let Some(sent) = sent_at(frame) {
                let now = epoch.elapsed().as_micros() as u64;
                let _ = hist.record(now.saturating_sub(sent).max(1));
            }
        }
        buf.drain(..read);
    }
    hist
}

/// The `"t":<micros>` of an event frame.
fn sent_at(frame: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(frame, b"\"t\":")? + 4;
    let digits = frame[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&frame[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// A multi dispatch to 10 in-process peers that answer at once.
async fn dispatch(admin: &Client, args: &BenchArgs) -> Result<Report> {
    use concord_core::api::{
        DispatchRequest, DispatchSelect, IfUnderMin, Quorum, Reducer, ReducerKind,
    };
    let peers = 10;
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for i in 0..peers {
        let reg = admin
            .register(&RegisterInstanceRequest {
                entity: "bench-peers".into(),
                role: Default::default(),
                label: Some(format!("peer {i}")),
                ttl_ms: Some(60_000),
                capabilities: vec!["bench".into()],
                endpoint: None,
                host: None,
                version: None,
                persistent: false,
                forked_from: None,
                meta: serde_json::json!({}),
            })
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let c = admin.with_token(reg.session_token);
        let stop = stop.clone();
        handles.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(tasks) = c.claim(&["dispatch.bench"], 10, None, 1_000).await {
                    for t in tasks {
                        let _ = c
                            .complete_task(&t.task.id, &t.claim, serde_json::json!({"v": 1}))
                            .await;
                    }
                }
            }
        }));
    }
    let req = Arc::new(DispatchRequest {
        command: "bench".into(),
        payload: serde_json::json!({}),
        select: DispatchSelect {
            entity: Some("bench-peers".into()),
            capabilities: vec!["bench".into()],
            roles: None,
        },
        quorum: Quorum::Multi,
        min: Some(peers),
        max: Some(peers),
        timeout_ms: Some(10_000),
        reducer: Some(Reducer {
            kind: ReducerKind::WeightedMean,
            path: Some("/v".into()),
            weight_path: None,
            score_path: None,
            key_path: None,
        }),
        if_under_min: IfUnderMin::Fail,
        idempotent: false,
        wait: Some(true),
    });
    let admin2 = admin.clone();
    let r = load(1, args.duration, move |_| {
        let (c, req) = (admin2.clone(), req.clone());
        Box::pin(async move {
            let v = c.dispatch(&req).await.map_err(|e| anyhow!("{e}"))?;
            if v.state != "completed" {
                return Err(anyhow!("dispatch {}: {}", v.state, v.outcome));
            }
            Ok(1)
        })
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.await;
    }
    Ok(Report {
        suite: "dispatch-multi-10".into(),
        ..r?
    })
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// The instances' TTL (DESIGN §4 default): they heartbeat every TTL/3.
const BENCH_TTL_S: u64 = 15;

async fn heartbeat(admin: &Client, url: &str, args: &BenchArgs, backend: &str) -> Result<Report> {
    let n = args.instances.max(1);
    eprintln!("registering {n} instances…");
    let started = Instant::now();
    // Registered instances, with when each last heartbeated. On a busy machine
    // registering 10,000 can take longer than their TTL: the keeper heartbeats
    // them meanwhile, every TTL/3 like a real instance, so that none expires
    // before the measurement begins.
    let registered: Arc<std::sync::Mutex<Vec<(String, Client, Instant)>>> =
        Arc::new(std::sync::Mutex::new(Vec::with_capacity(n)));
    let keeping = Arc::new(AtomicBool::new(true));
    let keeper = {
        let (registered, keeping) = (registered.clone(), keeping.clone());
        tokio::spawn(async move {
            while keeping.load(Ordering::Relaxed) {
                let due: Vec<(String, Client)> = {
                    let mut all = registered.lock().unwrap_or_else(|p| p.into_inner());
                    all.iter_mut()
                        .filter(|(_, _, last)| {
                            last.elapsed() > Duration::from_secs(BENCH_TTL_S / 3)
                        })
                        .take(256)
                        .map(|(id, c, last)| {
                            *last = Instant::now();
                            (id.clone(), c.clone())
                        })
                        .collect()
                };
                if due.is_empty() {
                    // Pacing: nothing is due for a while.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                let mut set = tokio::task::JoinSet::new();
                for (id, c) in due {
                    set.spawn(async move { c.heartbeat(&id).await });
                }
                while set.join_next().await.is_some() {}
            }
        })
    };
    let chunk = 64;
    let entities = (n / 10).max(1);
    for start in (0..n).step_by(chunk) {
        let mut set = tokio::task::JoinSet::new();
        for i in start..(start + chunk).min(n) {
            let c = admin.clone();
            set.spawn(async move {
                c.register(&RegisterInstanceRequest {
                    entity: format!("bench-{}", i % entities),
                    role: Default::default(),
                    label: Some(format!("bench {i}")),
                    ttl_ms: Some(BENCH_TTL_S as i64 * 1000),
                    capabilities: vec![],
                    endpoint: None,
                    host: None,
                    version: None,
                    persistent: false,
                    forked_from: None,
                    meta: serde_json::json!({}),
                })
                .await
            });
        }
        while let Some(r) = set.join_next().await {
            let reg = r?.map_err(|e| anyhow!("register: {e}"))?;
            let session = admin.with_token(reg.session_token);
            registered.lock().unwrap_or_else(|p| p.into_inner()).push((
                reg.instance.id,
                session,
                Instant::now(),
            ));
        }
    }
    keeping.store(false, Ordering::Relaxed);
    keeper.await?;
    eprintln!("registered in {:.1} s", started.elapsed().as_secs_f64());
    let sessions: Vec<(String, Client)> =
        std::mem::take(&mut *registered.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .map(|(id, c, _)| (id, c))
            .collect();
    let sessions = Arc::new(sessions);
    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs(args.duration.max(1));
    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..args.concurrency.max(1) {
        let sessions = sessions.clone();
        let (measuring, done) = (measuring.clone(), done.clone());
        let conc = args.concurrency.max(1);
        workers.push(tokio::spawn(async move {
            let mut hist = new_histogram();
            let mut errors = 0u64;
            let mut kinds: Vec<String> = Vec::new();
            let mut k = w;
            while !done.load(Ordering::Relaxed) {
                let (id, c) = &sessions[k % sessions.len()];
                k += conc;
                let t = Instant::now();
                let r = c.heartbeat(id).await;
                if measuring.load(Ordering::Relaxed) {
                    match r {
                        Ok(_) => {
                            let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                        }
                        Err(e) => {
                            errors += 1;
                            let kind = format!("{}: {}", e.code.as_str(), e.message);
                            if kinds.len() < 5 && !kinds.contains(&kind) {
                                kinds.push(kind);
                            }
                        }
                    }
                }
            }
            (hist, errors, kinds)
        }));
    }
    tokio::time::sleep(warmup).await;
    let before = store_counters(url).await?;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    crate::bench_progress::measure("heartbeat", measure).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let after = store_counters(url).await?;
    done.store(true, Ordering::Relaxed);
    let mut hist = new_histogram();
    let mut errors = 0;
    let mut error_kinds: Vec<String> = Vec::new();
    for w in workers {
        let (h, e, kinds) = w.await?;
        hist.add(&h).map_err(|e| anyhow!("{e}"))?;
        errors += e;
        for k in kinds {
            if error_kinds.len() < 5 && !error_kinds.contains(&k) {
                error_kinds.push(k);
            }
        }
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        suite: "heartbeat".into(),
        system: "concord".into(),
        backend: backend.into(),
        instances: n,
        concurrency: args.concurrency,
        duration_s: elapsed,
        operations: hist.len(),
        errors,
        throughput_per_s: hist.len() as f64 / elapsed,
        p50_ms: ms(0.5),
        p95_ms: ms(0.95),
        p99_ms: ms(0.99),
        max_ms: hist.max() as f64 / 1000.0,
        error_kinds,
        durable_writes: Some(after.0.saturating_sub(before.0)),
        token_lookups: Some(after.1.saturating_sub(before.1)),
        extra: serde_json::Value::Null,
    })
}

/// One worker's loop. Single items (`batch` 1): enqueue one task, then complete
/// the task it holds and claim the next in one call (`claim_next`), the way a
/// worker loops; the first cycle only claims. Batches: enqueue `batch` tasks, claim
/// up to `batch`, complete what it claimed. Latency is per cycle (two calls, or
/// three with batches); throughput counts completed tasks.
async fn queue(admin: &Client, args: &BenchArgs, backend: &str, batch: usize) -> Result<Report> {
    use concord_core::api::{ClaimRequest, CompleteItem, EnqueueRequest};
    let payload = serde_json::json!({ "blob": "x".repeat(1000) });
    let queue_name = format!("bench-{}", std::process::id());
    let conc = args.concurrency.max(1);
    let mut sessions = Vec::with_capacity(conc);
    for w in 0..conc {
        let reg = admin
            .register(&RegisterInstanceRequest {
                entity: "bench-workers".into(),
                role: Default::default(),
                label: Some(format!("worker {w}")),
                ttl_ms: Some(60_000),
                capabilities: vec![],
                endpoint: None,
                host: None,
                version: None,
                persistent: false,
                forked_from: None,
                meta: serde_json::json!({}),
            })
            .await
            .map_err(|e| anyhow!("register: {e}"))?;
        sessions.push(admin.with_token(reg.session_token));
    }
    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for c in sessions {
        let (measuring, done) = (measuring.clone(), done.clone());
        let (payload, queue_name) = (payload.clone(), queue_name.clone());
        workers.push(tokio::spawn(async move {
            let mut hist = new_histogram();
            let (mut tasks, mut errors) = (0u64, 0u64);
            // The claimed task a single-item worker completes in its next cycle.
            let mut held: Option<concord_core::api::ClaimedTask> = None;
            let mk = || EnqueueRequest {
                queue: queue_name.clone(),
                payload: payload.clone(),
                ..Default::default()
            };
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                let enq = if batch == 1 {
                    c.enqueue(&mk()).await.map(|_| ())
                } else {
                    c.enqueue_batch((0..batch).map(|_| mk()).collect())
                        .await
                        .map(|_| ())
                };
                let cycle = async {
                    enq?;
                    if batch == 1 {
                        let Some(t) = held.take() else {
                            held = c
                                .claim(&[queue_name.as_str()], 1, Some(60_000), 0)
                                .await?
                                .pop();
                            return Ok(0);
                        };
                        // As `concord work` does: the outcome, not the
                        // completed task echoed back (see `work::run_task`).
                        let (outcome, mut next) = c
                            .complete_batch_and_claim(
                                vec![CompleteItem {
                                    id: t.task.id,
                                    claim: t.claim,
                                    result: serde_json::json!(1),
                                }],
                                ClaimRequest {
                                    queues: vec![queue_name.clone()],
                                    max: Some(1),
                                    lease_ms: Some(60_000),
                                    wait_ms: None,
                                },
                            )
                            .await?;
                        held = next.pop();
                        if let Some(error) = outcome.into_iter().find_map(|o| o.error) {
                            return Err(crate::work::item_error(error));
                        }
                        return Ok::<u64, concord_core::Error>(1);
                    }
                    let claimed = c
                        .claim(&[queue_name.as_str()], batch as u32, Some(60_000), 0)
                        .await?;
                    let n = claimed.len() as u64;
                    if !claimed.is_empty() {
                        let items = claimed
                            .into_iter()
                            .map(|t| CompleteItem {
                                id: t.task.id,
                                claim: t.claim,
                                result: serde_json::json!(1),
                            })
                            .collect();
                        c.complete_batch(items).await?;
                    }
                    Ok::<u64, concord_core::Error>(n)
                };
                let r = cycle.await;
                if measuring.load(Ordering::Relaxed) {
                    match r {
                        Ok(n) => {
                            tasks += n;
                            let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            (hist, tasks, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes_before = store_writes(admin).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    crate::bench_progress::measure("queue", Duration::from_secs(args.duration.max(1))).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let writes = match (writes_before, store_writes(admin).await) {
        (Some(a), Some(b)) => b.since(&a, elapsed),
        _ => serde_json::Value::Null,
    };
    done.store(true, Ordering::Relaxed);
    let mut hist = new_histogram();
    let (mut tasks, mut errors) = (0, 0);
    for w in workers {
        let (h, t, e) = w.await?;
        hist.add(&h).map_err(|e| anyhow!("{e}"))?;
        tasks += t;
        errors += e;
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        system: "concord".into(),
        suite: if batch == 1 {
            "queue".into()
        } else {
            format!("queue-batch-{batch}")
        },
        backend: backend.into(),
        instances: conc,
        concurrency: conc,
        duration_s: elapsed,
        operations: tasks,
        errors,
        throughput_per_s: tasks as f64 / elapsed,
        p50_ms: ms(0.5),
        p95_ms: ms(0.95),
        p99_ms: ms(0.99),
        max_ms: hist.max() as f64 / 1000.0,
        error_kinds: Vec::new(),
        durable_writes: None,
        token_lookups: None,
        extra: serde_json::json!({ "store_writes": writes }),
    })
}

/// The hub's store counters (`/metrics`), read around a measurement to say how
/// busy the writer was and how much each commit carried.
struct StoreWrites {
    commits: f64,
    operations: f64,
    busy_s: f64,
    commit_s: f64,
}

impl StoreWrites {
    /// What happened between `before` and this reading, `secs` apart.
    fn since(&self, before: &StoreWrites, secs: f64) -> serde_json::Value {
        let commits = (self.commits - before.commits).max(1.0);
        serde_json::json!({
            "busy_fraction": (self.busy_s - before.busy_s) / secs.max(1e-9),
            "operations_per_commit": (self.operations - before.operations) / commits,
            "commit_ms": 1000.0 * (self.commit_s - before.commit_s) / commits,
            "commits_per_s": (self.commits - before.commits) / secs.max(1e-9),
        })
    }
}

/// `None` when the hub cannot be read (a `--hub` behind a proxy without
/// `/metrics`, an older hub): the report then goes without these figures.
async fn store_writes(admin: &Client) -> Option<StoreWrites> {
    let text = hub_metrics(admin.urls().first()?).await.ok()?;
    Some(StoreWrites {
        commits: metric(&text, "concord_store_commits_total")?,
        operations: metric(&text, "concord_store_committed_operations_total")?,
        busy_s: metric(&text, "concord_store_busy_seconds_total")?,
        commit_s: metric(&text, "concord_store_commit_seconds_total")?,
    })
}

/// One iteration of a load loop: the number of units (tasks, heartbeats) it did.
pub type Job = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64>> + Send>>;

/// Runs `make(worker)` in a loop on `conc` workers: a 1 s warm-up, then `secs`
/// measured. Latency is per iteration; throughput counts units.
pub async fn load<F>(conc: usize, secs: u64, make: F) -> Result<Report>
where
    F: Fn(usize) -> Job + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..conc.max(1) {
        let (make, measuring, done) = (make.clone(), measuring.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut hist = new_histogram();
            let (mut units, mut errors, mut last_err) = (0u64, 0u64, None);
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = make(w).await;
                if measuring.load(Ordering::Relaxed) {
                    match r {
                        Ok(n) => {
                            units += n;
                            let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                        }
                        Err(e) => {
                            errors += 1;
                            last_err = Some(e.to_string());
                        }
                    }
                } else if let Err(e) = r {
                    last_err = Some(e.to_string());
                    errors += 1;
                    if errors > 100 {
                        break;
                    }
                }
            }
            (hist, units, errors, last_err)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    crate::bench_progress::measure("load", Duration::from_secs(secs.max(1))).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let mut hist = new_histogram();
    let (mut units, mut errors, mut last) = (0, 0, None);
    for w in workers {
        let (h, u, e, l) = w.await?;
        hist.add(&h).map_err(|e| anyhow!("{e}"))?;
        units += u;
        errors += e;
        last = last.or(l);
    }
    if units == 0 {
        return Err(anyhow!(
            "no successful operation ({errors} errors; last: {})",
            last.unwrap_or_default()
        ));
    }
    Ok(Report::from_hist(
        "",
        "",
        conc,
        elapsed,
        &hist,
        errors,
        units as f64 / elapsed,
    ))
}

impl Report {
    pub fn from_hist(
        suite: &str,
        system: &str,
        conc: usize,
        secs: f64,
        hist: &Histogram<u64>,
        errors: u64,
        throughput: f64,
    ) -> Report {
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        Report {
            suite: suite.into(),
            system: system.into(),
            backend: String::new(),
            instances: 0,
            concurrency: conc,
            duration_s: secs,
            operations: hist.len(),
            errors,
            throughput_per_s: throughput,
            p50_ms: ms(0.5),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
            max_ms: hist.max() as f64 / 1000.0,
            error_kinds: Vec::new(),
            durable_writes: None,
            token_lookups: None,
            extra: serde_json::Value::Null,
        }
    }

    pub fn named(mut self, system: &str) -> Report {
        self.system = system.into();
        self
    }
}

/// The ingest and recall suites (see `bench_memory`).
async fn memory(
    admin: &Client,
    args: &BenchArgs,
    suite: Suite,
    backend: &str,
    index: Option<Arc<concord_server::recall::RecallIndex>>,
) -> Result<Report> {
    use crate::bench_memory as bm;
    let corpus = Arc::new(bm::Corpus::new());
    let writers = bm::writers(admin, 8).await?;
    eprintln!(
        "ingesting {} memories ({}-d vectors) in batches of {}…",
        args.memories,
        bm::DIM,
        args.batch
    );
    let ing = bm::ingest(
        &writers,
        corpus.clone(),
        args.memories,
        args.batch.max(1),
        args.concurrency,
        !args.no_vectors,
    )
    .await?;
    let rate = ing.memories as f64 / ing.seconds;
    let batch_q = bm::quantiles(ing.batch_latency_us.clone());
    let q = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let base = Report {
        suite: String::new(),
        system: "concord".into(),
        backend: backend.into(),
        instances: writers.len(),
        concurrency: args.concurrency,
        duration_s: 0.0,
        operations: 0,
        errors: 0,
        throughput_per_s: 0.0,
        p50_ms: 0.0,
        p95_ms: 0.0,
        p99_ms: 0.0,
        max_ms: 0.0,
        error_kinds: vec![],
        durable_writes: None,
        token_lookups: None,
        extra: serde_json::Value::Null,
    };
    if let Suite::Ingest = suite {
        return Ok(Report {
            suite: "ingest".into(),
            duration_s: ing.seconds,
            operations: ing.memories as u64,
            errors: ing.errors,
            throughput_per_s: rate,
            p50_ms: q(&batch_q, "p50_ms"),
            p95_ms: q(&batch_q, "p95_ms"),
            p99_ms: q(&batch_q, "p99_ms"),
            max_ms: q(&batch_q, "max_ms"),
            extra: serde_json::json!({"memories_per_s": rate, "batch": args.batch, "vectors": !args.no_vectors, "batch_latency": batch_q}),
            ..base
        });
    }
    eprintln!("ingested at {rate:.0}/s; measuring recall…");
    let dur = Duration::from_secs(args.duration.max(1));
    let r = bm::recall(&writers[0], index, corpus, dur, args.concurrency).await?;
    let ft = bm::quantiles(r.fulltext_us.clone());
    let hy = bm::quantiles(r.hybrid_us.clone());
    Ok(Report {
        suite: "recall".into(),
        duration_s: dur.as_secs_f64() * 2.0,
        operations: (r.fulltext_us.len() + r.hybrid_us.len()) as u64,
        throughput_per_s: r.fulltext_us.len() as f64 / dur.as_secs_f64(),
        p50_ms: q(&ft, "p50_ms"),
        p95_ms: q(&ft, "p95_ms"),
        p99_ms: q(&ft, "p99_ms"),
        max_ms: q(&ft, "max_ms"),
        extra: serde_json::json!({
            "memories": args.memories,
            "ingest_per_s": rate,
            "fulltext": ft,
            "fulltext_mean_hits": r.mean_hits,
            "hybrid": hy,
            "hybrid_mode_ok": r.hybrid_modes_ok,
            "ann_recall_at_10_vs_exact": r.recall_at_10,
            "recall_queries": r.recall_queries,
        }),
        ..base
    })
}
