//! The Markdown report and SVG chart of `concord bench --markdown` (used by
//! scripts/bench-all): medians over runs with their spread, each Concord figure
//! beside its baselines as a ratio, and the DESIGN §10 budget met or not.

use crate::bench::Report;
use anyhow::Result;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

struct Budget {
    suite: &'static str,
    text: &'static str,
    check: fn(&Agg) -> bool,
}

const BUDGETS: &[Budget] = &[
    Budget {
        suite: "queue",
        text: "≥ 10,000 tasks/s",
        check: |a| a.tput >= 10_000.0,
    },
    Budget {
        suite: "queue-batch-100",
        text: "≥ 50,000 tasks/s",
        check: |a| a.tput >= 50_000.0,
    },
    Budget {
        suite: "heartbeat",
        text: "≥ 20,000/s, p99 < 5 ms",
        check: |a| a.tput >= 20_000.0 && a.p99 < 5.0,
    },
    Budget {
        suite: "events",
        text: "p99 < 5 ms at 5,000 events/s to 100 subscribers",
        check: |a| a.p99 < 5.0,
    },
    Budget {
        suite: "dispatch-multi-10",
        text: "p99 < 10 ms overhead",
        check: |a| a.p99 < 10.0,
    },
    Budget {
        suite: "ingest",
        text: "≥ 5,000 memories/s",
        check: |a| a.tput >= 5_000.0,
    },
    Budget {
        suite: "recall",
        text: "full-text p99 < 10 ms",
        check: |a| a.p99 < 10.0,
    },
    Budget {
        suite: "recall",
        text: "hybrid p99 < 20 ms, recall@10 ≥ 0.95 vs exact",
        check: |a| {
            a.hybrid_p99.is_some_and(|p| p < 20.0) && a.recall_at_10.is_some_and(|r| r >= 0.95)
        },
    },
    Budget {
        suite: "idle",
        text: "RSS < 30 MiB, start < 200 ms",
        check: |a| a.rss_mib.is_some_and(|r| r < 30.0) && a.p50 < 200.0,
    },
];

/// Median and spread of one (suite, system) over runs.
struct Agg {
    tput: f64,
    tput_min: f64,
    tput_max: f64,
    p50: f64,
    p99: f64,
    runs: usize,
    /// Concurrent clients (the same in every run of a suite).
    concurrency: usize,
    /// Recall suite: the hybrid queries' p99 and the ANN's recall@10.
    hybrid_p99: Option<f64>,
    recall_at_10: Option<f64>,
    /// Events suite: how long publishes took to be acknowledged, p99.
    publish_p99: Option<f64>,
    /// Idle suite: resident size after settling, its peak, and the time to the
    /// first answer (the start time is `p50`).
    rss_mib: Option<f64>,
    peak_rss_mib: Option<f64>,
    first_answer_ms: Option<f64>,
    rss_range: Option<(f64, f64)>,
    /// Queue suites: the store writer's busy fraction, commits/s, operations
    /// per commit and COMMIT ms per commit, from the hub's `/metrics`.
    store_writes: Option<Vec<f64>>,
}

/// The median of an `extra` figure over runs, if the runs reported it.
fn extra_median(rs: &[&Report], path: &[&str]) -> Option<f64> {
    let v: Vec<f64> = rs
        .iter()
        .filter_map(|r| {
            path.iter()
                .try_fold(&r.extra, |v, k| v.get(*k))
                .and_then(|v| v.as_f64())
        })
        .collect();
    (!v.is_empty()).then(|| median(v))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub fn write(path: &Path, reports: &[Report], args: &str) -> Result<()> {
    let mut groups: BTreeMap<(String, String), Vec<&Report>> = BTreeMap::new();
    for r in reports {
        groups
            .entry((r.suite.clone(), r.system.clone()))
            .or_default()
            .push(r);
    }
    let agg: BTreeMap<(String, String), Agg> = groups
        .into_iter()
        .map(|(k, rs)| {
            let t: Vec<f64> = rs.iter().map(|r| r.throughput_per_s).collect();
            let a = Agg {
                tput: median(t.clone()),
                tput_min: t.iter().cloned().fold(f64::INFINITY, f64::min),
                tput_max: t.iter().cloned().fold(0.0, f64::max),
                p50: median(rs.iter().map(|r| r.p50_ms).collect()),
                p99: median(rs.iter().map(|r| r.p99_ms).collect()),
                runs: rs.len(),
                concurrency: rs.first().map(|r| r.concurrency).unwrap_or(0),
                hybrid_p99: extra_median(&rs, &["hybrid", "p99_ms"]),
                recall_at_10: extra_median(&rs, &["ann_recall_at_10_vs_exact"]),
                publish_p99: extra_median(&rs, &["publish_acked_ms", "p99"]),
                rss_mib: extra_median(&rs, &["rss_mib"]),
                peak_rss_mib: extra_median(&rs, &["peak_rss_mib"]),
                first_answer_ms: extra_median(&rs, &["first_answer_ms"]),
                store_writes: [
                    "busy_fraction",
                    "commits_per_s",
                    "operations_per_commit",
                    "commit_ms",
                ]
                .iter()
                .map(|k| extra_median(&rs, &["store_writes", k]))
                .collect::<Option<Vec<f64>>>(),
                rss_range: {
                    let v: Vec<f64> = rs
                        .iter()
                        .filter_map(|r| r.extra.get("rss_mib")?.as_f64())
                        .collect();
                    (!v.is_empty()).then(|| {
                        v.iter().fold((f64::INFINITY, 0.0_f64), |(lo, hi), &x| {
                            (lo.min(x), hi.max(x))
                        })
                    })
                },
            };
            (k, a)
        })
        .collect();
    let mut md = String::new();
    writeln!(md, "# Benchmarks\n")?;
    writeln!(
        md,
        "Generated by `scripts/bench-all` (`concord bench all {args}`), {}.\n",
        concord_core::Timestamp::now().to_rfc3339()
    )?;
    writeln!(
        md,
        "Machine: {} cores, {} memory; {}.\n",
        num_cpus(),
        mem_total(),
        os()
    )?;
    writeln!(
        md,
        "Figures are medians over runs, with the range of throughput in brackets. Latency in ms. \
         Clients per suite unless `--concurrency` is given: 16 workers for the queue suites (the \
         figure DESIGN §10 budgets), 4 for recall (a latency budget; at 64 clients on two cores \
         p99 is mostly time spent queueing), 64 otherwise; baselines run with the same.\n"
    )?;
    let ceiling = agg
        .iter()
        .find(|((s, _), _)| s == "http-ceiling")
        .map(|(_, a)| a.tput);
    let suites: Vec<String> = {
        let mut v: Vec<String> = agg.keys().map(|(s, _)| s.clone()).collect();
        v.dedup();
        v
    };
    for suite in &suites {
        writeln!(md, "## {suite}\n")?;
        if suite == "idle" {
            idle_section(&mut md, agg.get(&(suite.clone(), "concord".into())))?;
            continue;
        }
        writeln!(
            md,
            "| system | clients | throughput/s | p50 | p99 | runs | vs Concord |"
        )?;
        writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
        let concord = agg.get(&(suite.clone(), "concord".into())).map(|a| a.tput);
        for ((s, system), a) in agg.iter().filter(|((s, _), _)| s == suite) {
            let _ = s;
            let ratio = match (concord, system.as_str()) {
                (_, "concord") | (None, _) => "-".to_string(),
                (Some(c), _) if a.tput > 0.0 => format!("Concord = {:.2}×", c / a.tput),
                _ => "-".to_string(),
            };
            writeln!(
                md,
                "| {system} | {} | {:.0} [{:.0}–{:.0}] | {:.3} | {:.3} | {} | {ratio} |",
                a.concurrency, a.tput, a.tput_min, a.tput_max, a.p50, a.p99, a.runs
            )?;
        }
        if let Some(a) = agg.get(&(suite.clone(), "concord".into())) {
            if let (Some(h), Some(r)) = (a.hybrid_p99, a.recall_at_10) {
                writeln!(md, "\nConcord's row is full-text recall. Hybrid (full-text + 384-d vectors): p99 {h:.3} ms; the vector index's recall@10 against exact search: {r:.3}.")?;
            }
            if let Some(w) = &a.store_writes {
                writeln!(md, "\nThe store's writer (medians over runs, from the hub's `/metrics`): busy {:.0}% of the time, {:.0} commits/s, {:.1} operations and {:.3} ms of COMMIT per commit.", 100.0 * w[0], w[1], w[2], w[3])?;
            }
            if let Some(p) = a.publish_p99 {
                writeln!(md, "\nOf the delivery latency, a publish took p99 {p:.3} ms to be acknowledged (committed and fsynced) before fan-out began.")?;
            }
        }
        if suite == "disk-fsync" {
            writeln!(md, "\nThe disk under the hubs' data: one 4 KiB append and `fdatasync`, one after another, for a few seconds. Every acknowledged write of `--durability full` waits for one such flush (a group commit shares it), so its p50 is a floor under the latency of any single durable call.")?;
        }
        if let (Some(c), Some(ceil)) = (concord, ceiling) {
            if suite != "http-ceiling" && suite != "events" && suite != "dispatch-multi-10" {
                // A single-item cycle is an enqueue and a completion that claims
                // the next; a batch cycle enqueues, claims and completes.
                let calls = match suite.as_str() {
                    "queue" => 2.0,
                    s if s.starts_with("queue") => 3.0,
                    _ => 1.0,
                };
                let per_call = if suite == "queue-batch-100" {
                    c / 100.0
                } else {
                    c
                };
                writeln!(md, "\nFraction of the HTTP ceiling ({ceil:.0} req/s): {:.1}% of the calls it could serve.", 100.0 * per_call * calls / ceil)?;
            }
        }
        if let Some(a) = agg.get(&(suite.clone(), "concord".into())) {
            budget_lines(&mut md, suite, a)?;
        }
        writeln!(md)?;
    }
    std::fs::write(path, md)?;
    std::fs::write(path.with_extension("svg"), chart(&agg))?;
    Ok(())
}

/// The idle suite has no throughput: start time and resident size instead.
fn idle_section(md: &mut String, a: Option<&Agg>) -> Result<()> {
    let Some(a) = a else { return Ok(()) };
    let (lo, hi) = a.rss_range.unwrap_or((f64::NAN, f64::NAN));
    writeln!(
        md,
        "A fresh embedded hub (`concord serve` on an empty data dir, a child process of the bench): \
         start is spawn to its \"listening\" line, then its first answer to `/healthz`; resident \
         size (`VmRSS`) after it idled, and its peak (`VmHWM`).\n"
    )?;
    writeln!(
        md,
        "| start ms | first answer ms | RSS MiB | peak RSS MiB | runs |\n| ---: | ---: | ---: | ---: | ---: |"
    )?;
    writeln!(
        md,
        "| {:.1} | {:.1} | {:.1} [{lo:.1}–{hi:.1}] | {:.1} | {} |",
        a.p50,
        a.first_answer_ms.unwrap_or(f64::NAN),
        a.rss_mib.unwrap_or(f64::NAN),
        a.peak_rss_mib.unwrap_or(f64::NAN),
        a.runs
    )?;
    budget_lines(md, "idle", a)?;
    writeln!(md)?;
    Ok(())
}

/// The suite's DESIGN §10 budgets, each met or not.
fn budget_lines(md: &mut String, suite: &str, a: &Agg) -> Result<()> {
    for b in BUDGETS.iter().filter(|b| b.suite == suite) {
        writeln!(
            md,
            "\nBudget (DESIGN §10): {} — **{}**.",
            b.text,
            if (b.check)(a) { "met" } else { "not met" }
        )?;
    }
    Ok(())
}

/// A horizontal bar chart of throughput per suite and system (log scale).
fn chart(agg: &BTreeMap<(String, String), Agg>) -> String {
    let rows: Vec<(&(String, String), &Agg)> = agg.iter().filter(|(_, a)| a.tput > 0.0).collect();
    let h = 30 + rows.len() * 22;
    let max = rows.iter().map(|(_, a)| a.tput.log10()).fold(1.0, f64::max);
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='900' height='{h}' font-family='sans-serif' font-size='12'>\
         <text x='10' y='18' font-weight='bold'>Throughput per second (log scale)</text>"
    );
    for (i, ((suite, system), a)) in rows.iter().enumerate() {
        let y = 30 + i * 22;
        let w = (a.tput.log10() / max * 480.0).max(2.0);
        let color = if system == "concord" {
            "#2b6cb0"
        } else {
            "#a0aec0"
        };
        let _ = write!(
            s,
            "<text x='10' y='{}'>{suite} · {system}</text><rect x='300' y='{y}' width='{w:.0}' height='16' fill='{color}'/>\
             <text x='{:.0}' y='{}'>{:.0}</text>",
            y + 12,
            305.0 + w,
            y + 12,
            a.tput
        );
    }
    s.push_str("</svg>\n");
    s
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into())
}

fn os() -> String {
    std::fs::read_to_string("/proc/version")
        .map(|v| v.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
