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
    /// Memory ingest with 384-d vectors through the batch endpoint (≥ 5,000/s).
    Ingest,
    /// Recall over `--memories` memories: full-text p99 < 10 ms, hybrid p99 < 20 ms,
    /// recall@10 ≥ 0.95 against exact search.
    Recall,
}

#[derive(Args)]
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
    /// Concurrent client connections.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Live instances (heartbeat suite).
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
    /// Print one JSON object instead of lines.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    suite: String,
    backend: String,
    instances: usize,
    concurrency: usize,
    duration_s: f64,
    operations: u64,
    errors: u64,
    throughput_per_s: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Suite-specific figures (the memory suites).
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    extra: serde_json::Value,
}

/// A hub started in-process on a temp dir, stopped when dropped.
struct Embedded {
    url: String,
    admin: String,
    backend: &'static str,
    state: Arc<concord_server::AppState>,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Embedded {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn embedded(database: Option<&str>) -> Result<Embedded> {
    let dir = tempfile::tempdir()?;
    let store: DynStore = match database {
        Some(url) => Arc::new(
            concord_store::postgres::PostgresStore::connect(
                url,
                Some(&format!("bench_{}", std::process::id())),
            )
            .await
            .map_err(|e| anyhow!("{e}"))?,
        ),
        None => Arc::new(
            concord_store::sqlite::SqliteStore::open(
                &dir.path().join("concord.db"),
                concord_store::sqlite::Durability::Full,
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
    tokio::spawn(hub.serve(listener, async move {
        let _ = rx.await;
    }));
    Ok(Embedded {
        url,
        admin,
        backend,
        state,
        _dir: dir,
        stop: Some(stop),
    })
}

pub async fn run(args: BenchArgs) -> Result<()> {
    let (guard, url, admin, backend) = match &args.hub {
        Some(url) => {
            let token = args
                .token
                .clone()
                .ok_or_else(|| anyhow!("--hub needs --token (an admin token)"))?;
            (None, url.clone(), token, "remote")
        }
        None => {
            let e = embedded(args.database.as_deref()).await?;
            let (u, a, b) = (e.url.clone(), e.admin.clone(), e.backend);
            (Some(e), u, a, b)
        }
    };
    let client = Client::new(vec![url], Some(admin)).map_err(|e| anyhow!("{e}"))?;
    let report = match args.suite {
        Suite::Heartbeat => heartbeat(&client, &args, backend).await?,
        Suite::Ingest | Suite::Recall => {
            let index = guard.as_ref().map(|g| g.state.memory.index.clone());
            memory(&client, &args, backend, index).await?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} ({} backend): {} instances, {} connections, {:.1} s\n  throughput {:.0}/s  ops {}  errors {}\n  latency ms: p50 {:.3}  p95 {:.3}  p99 {:.3}  max {:.3}",
            report.suite, report.backend, report.instances, report.concurrency, report.duration_s,
            report.throughput_per_s, report.operations, report.errors,
            report.p50_ms, report.p95_ms, report.p99_ms, report.max_ms
        );
        if !report.extra.is_null() {
            println!("  {}", serde_json::to_string_pretty(&report.extra)?);
        }
    }
    Ok(())
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

async fn heartbeat(admin: &Client, args: &BenchArgs, backend: &str) -> Result<Report> {
    let n = args.instances.max(1);
    eprintln!("registering {n} instances…");
    // Register with bounded parallelism.
    let mut sessions: Vec<(String, Client)> = Vec::with_capacity(n);
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
                    ttl_ms: Some(15_000),
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
            sessions.push((reg.instance.id, admin.with_token(reg.session_token)));
        }
    }
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
                        Err(_) => errors += 1,
                    }
                }
            }
            (hist, errors)
        }));
    }
    tokio::time::sleep(warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(measure).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let mut hist = new_histogram();
    let mut errors = 0;
    for w in workers {
        let (h, e) = w.await?;
        hist.add(&h).map_err(|e| anyhow!("{e}"))?;
        errors += e;
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        suite: "heartbeat".into(),
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
        extra: serde_json::Value::Null,
    })
}

/// The ingest and recall suites (see `bench_memory`).
async fn memory(
    admin: &Client,
    args: &BenchArgs,
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
    if let Suite::Ingest = args.suite {
        return Ok(Report {
            suite: "ingest".into(),
            backend: backend.into(),
            instances: writers.len(),
            concurrency: args.concurrency,
            duration_s: ing.seconds,
            operations: ing.memories as u64,
            errors: ing.errors,
            throughput_per_s: rate,
            p50_ms: q(&batch_q, "p50_ms"),
            p95_ms: q(&batch_q, "p95_ms"),
            p99_ms: q(&batch_q, "p99_ms"),
            max_ms: q(&batch_q, "max_ms"),
            extra: serde_json::json!({"memories_per_s": rate, "batch": args.batch, "vectors": !args.no_vectors, "batch_latency": batch_q}),
        });
    }
    eprintln!("ingested at {rate:.0}/s; measuring recall…");
    let dur = Duration::from_secs(args.duration.max(1));
    let r = bm::recall(&writers[0], index, corpus, dur, args.concurrency).await?;
    let ft = bm::quantiles(r.fulltext_us.clone());
    let hy = bm::quantiles(r.hybrid_us.clone());
    Ok(Report {
        suite: "recall".into(),
        backend: backend.into(),
        instances: writers.len(),
        concurrency: args.concurrency,
        duration_s: dur.as_secs_f64() * 2.0,
        operations: (r.fulltext_us.len() + r.hybrid_us.len()) as u64,
        errors: 0,
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
    })
}
