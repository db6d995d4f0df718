//! The `idle` suite: how fast a fresh embedded hub starts and how much memory it
//! holds doing nothing (DESIGN §10: start < 200 ms, RSS < 30 MiB).
//!
//! Why a child process and not the in-process hub the other suites start: the
//! bench's own runtime, load generator and baselines would be counted in the
//! resident size, and start time includes what a user waits for, exec and the
//! dynamic loader included. The child is this same binary running `serve` on a
//! fresh data directory, so the figure is the release build's own.

use crate::bench::Report;
use anyhow::{anyhow, Context, Result};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

/// How long the hub idles before its resident size is read: past start-up's
/// transient allocations (migrations, the first checkpoint), capped by
/// `--duration` so the CI smoke run stays short.
const SETTLE: Duration = Duration::from_secs(3);

/// The hub's stderr line that says it is serving (see `serve.rs`).
const READY: &str = " listening on ";

/// Starts `concord serve` on a fresh data dir; measures the time to its ready
/// line and to its first answer, then its resident size after settling.
pub async fn measure(duration_s: u64) -> Result<Report> {
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe().context("cannot find the concord binary")?;
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new(exe)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        // The suite measures the embedded hub, whatever the caller's environment says.
        .env_remove("CONCORD_DATABASE_URL")
        .env_remove("CONCORD_LISTEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start `concord serve`")?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow!("the hub exited at once"))?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| anyhow!("the hub did not say it was listening within 30 s"))??
            .ok_or_else(|| anyhow!("the hub exited before listening"))?;
        if let Some(rest) = line.split(READY).nth(1) {
            break rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
        }
    };
    let start_ms = ms(t0.elapsed());
    // Keep draining stderr so the hub never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let health = reqwest::get(format!("{url}/healthz")).await?;
    let first_answer_ms = ms(t0.elapsed());
    if !health.status().is_success() {
        return Err(anyhow!("/healthz answered {}", health.status()));
    }
    let settle = SETTLE.min(Duration::from_secs(duration_s.max(1)));
    crate::bench_progress::measure("idle", settle).await;
    let (rss, peak) = resident_kib(pid)?;
    child.kill().await.ok();
    let (rss_mib, peak_mib) = (rss as f64 / 1024.0, peak as f64 / 1024.0);
    Ok(Report {
        suite: "idle".into(),
        system: "concord".into(),
        backend: "sqlite".into(),
        instances: 0,
        concurrency: 0,
        duration_s: settle.as_secs_f64(),
        operations: 1,
        errors: 0,
        throughput_per_s: 0.0,
        // The one latency of this suite: spawn to "listening".
        p50_ms: start_ms,
        p95_ms: start_ms,
        p99_ms: start_ms,
        max_ms: start_ms,
        error_kinds: vec![],
        durable_writes: None,
        token_lookups: None,
        extra: serde_json::json!({
            "start_ms": start_ms,
            "first_answer_ms": first_answer_ms,
            "rss_mib": rss_mib,
            "peak_rss_mib": peak_mib,
            "settle_s": settle.as_secs_f64(),
        }),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `VmRSS` and `VmHWM` (peak) of a process, in KiB, from /proc.
fn resident_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("resident size needs /proc (Linux)")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}
