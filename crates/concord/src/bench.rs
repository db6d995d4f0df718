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
    /// The first error of each kind (code and message), so a run with errors
    /// says what they were.
    error_kinds: Vec<String>,
    throughput_per_s: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Store round trips the hub made for these heartbeats during the measured
    /// window (from its /metrics): durable lease writes, and token lookups the
    /// auth cache could not answer. Everything else was answered from memory.
    durable_writes: u64,
    token_lookups: u64,
}

/// The hub's counters that tell how many heartbeats reached the store.
async fn store_counters(url: &str) -> Result<(u64, u64)> {
    let text = reqwest::get(format!("{url}/metrics")).await?.text().await?;
    let counter = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    Ok((
        counter("concord_heartbeats_durable_total "),
        counter("concord_token_lookups_total "),
    ))
}

/// A hub started in-process on a temp dir, stopped when dropped.
struct Embedded {
    url: String,
    admin: String,
    backend: &'static str,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// On PostgreSQL: the database and the schema made for this run.
    pg: Option<(String, String)>,
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
    }
}

async fn embedded(database: Option<&str>) -> Result<Embedded> {
    let dir = tempfile::tempdir()?;
    let pg = database.map(|url| (url.to_string(), format!("bench_{}", std::process::id())));
    let store: DynStore = match &pg {
        Some((url, schema)) => Arc::new(
            concord_store::postgres::PostgresStore::connect(url, Some(schema))
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, rx) = tokio::sync::oneshot::channel();
    let served = tokio::spawn(hub.serve(listener, async move {
        let _ = rx.await;
    }));
    Ok(Embedded {
        url,
        admin,
        backend,
        _dir: dir,
        stop: Some(stop),
        served: Some(served),
        pg,
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
    let report = async {
        let client = Client::new(vec![url.clone()], Some(admin)).map_err(|e| anyhow!("{e}"))?;
        match args.suite {
            Suite::Heartbeat => heartbeat(&client, &url, &args, backend).await,
        }
    }
    .await;
    // Clean up (the PostgreSQL schema of the run) whether or not it succeeded.
    if let Some(g) = guard {
        g.finish().await?;
    }
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} ({} backend): {} instances, {} connections, {:.1} s\n  throughput {:.0}/s  ops {}  errors {}\n  latency ms: p50 {:.3}  p95 {:.3}  p99 {:.3}  max {:.3}\n  store round trips: {} durable lease writes, {} token lookups",
            report.suite, report.backend, report.instances, report.concurrency, report.duration_s,
            report.throughput_per_s, report.operations, report.errors,
            report.p50_ms, report.p95_ms, report.p99_ms, report.max_ms,
            report.durable_writes, report.token_lookups
        );
        for k in &report.error_kinds {
            println!("  error: {k}");
        }
    }
    Ok(())
}

/// The instances' TTL (DESIGN §4 default): heartbeats every TTL/3.
const BENCH_TTL_S: u64 = 15;

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

async fn heartbeat(admin: &Client, url: &str, args: &BenchArgs, backend: &str) -> Result<Report> {
    let n = args.instances.max(1);
    eprintln!("registering {n} instances…");
    let started = Instant::now();
    // Registered instances, with when each last heartbeated. On a busy machine
    // registering 10,000 can take longer than their TTL: the keeper heartbeats
    // them meanwhile, every TTL/3 like a real instance, so none expires before
    // the measurement begins.
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
                            if kinds.len() < 5 && !kinds.iter().any(|k| k == &kind) {
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
    tokio::time::sleep(measure).await;
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
        backend: backend.into(),
        instances: n,
        concurrency: args.concurrency,
        duration_s: elapsed,
        operations: hist.len(),
        errors,
        error_kinds,
        throughput_per_s: hist.len() as f64 / elapsed,
        p50_ms: ms(0.5),
        p95_ms: ms(0.95),
        p99_ms: ms(0.99),
        max_ms: hist.max() as f64 / 1000.0,
        durable_writes: after.0.saturating_sub(before.0),
        token_lookups: after.1.saturating_sub(before.1),
    })
}
