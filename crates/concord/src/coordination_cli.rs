//! `concord observe`, `concord breaker list|show`, `concord lease
//! acquire|list|release|renew|check`: shared circuit breakers and resource leases.
//!
//! `concord lease check PATHS…` exits non-zero when another live instance holds an
//! exclusive lease overlapping one of the paths, so it works as a git pre-commit
//! hook (see README).

use crate::cli::{e, Conn};
use crate::output::{self, opt, table};
use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use concord_core::api::{
    AcquireLeaseRequest, BreakerState, BreakerView, Lease, LeaseMode, ObservationRequest,
};

#[derive(Args)]
pub struct ObserveArgs {
    /// What was called, e.g. provider:kimi/k2p5.
    subject: String,
    /// ok, error or timeout.
    outcome: String,
    #[arg(long)]
    latency_ms: Option<i64>,
    #[arg(long)]
    detail: Option<String>,
    /// The probe this reports on (from `POST /v1/breakers/{subject}/probe`).
    #[arg(long)]
    probe_id: Option<String>,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Subcommand)]
pub enum BreakerCmd {
    /// List breakers (optionally only those in one state).
    List {
        /// closed, open or half_open.
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// One subject's breaker.
    Show {
        subject: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub enum LeaseCmd {
    /// Acquire a lease for this instance (needs its session token).
    Acquire {
        /// A name or a path glob (`dir/` means `dir/**`).
        resource: String,
        #[arg(long)]
        shared: bool,
        #[arg(long)]
        ttl_ms: Option<i64>,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Live leases.
    List {
        /// Only leases overlapping this name or glob.
        #[arg(long)]
        resource: Option<String>,
        #[arg(long)]
        holder: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Release a lease (the holder's session; --force with an admin token).
    Release {
        id: String,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Extend a lease to now + ttl.
    Renew {
        id: String,
        #[arg(long)]
        ttl_ms: Option<i64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Exit 1 if another live instance holds an exclusive lease overlapping a path.
    Check {
        paths: Vec<String>,
        /// Prepended to every path (e.g. `repo:/` when leases name `repo:/src/**`).
        #[arg(long, default_value = "")]
        prefix: String,
        /// This instance's id: its own leases are not conflicts.
        #[arg(long, env = "CONCORD_INSTANCE")]
        instance: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
}

pub async fn observe(a: ObserveArgs) -> Result<()> {
    let r = a
        .conn
        .client()?
        .observe(&ObservationRequest {
            subject: a.subject,
            outcome: a.outcome,
            latency_ms: a.latency_ms,
            detail: a.detail,
            probe_id: a.probe_id,
            idempotency_key: None,
        })
        .await
        .map_err(e)?;
    if a.conn.json {
        return output::json(&r);
    }
    println!("accepted {}", r.accepted);
    Ok(())
}

fn breaker_rows(list: &[BreakerView]) -> Vec<Vec<String>> {
    list.iter()
        .map(|b| {
            vec![
                b.subject.clone(),
                b.state.as_str().to_string(),
                format!("{:.0}%", b.error_rate * 100.0),
                b.samples.to_string(),
                b.p50_ms
                    .map(|v| format!("{v} ms"))
                    .unwrap_or_else(|| "-".into()),
                b.p95_ms
                    .map(|v| format!("{v} ms"))
                    .unwrap_or_else(|| "-".into()),
                b.retry_at
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect()
}

const BREAKER_HEAD: &[&str] = &[
    "SUBJECT", "STATE", "ERRORS", "SAMPLES", "P50", "P95", "RETRY AT",
];

pub async fn breaker(cmd: BreakerCmd) -> Result<()> {
    match cmd {
        BreakerCmd::List { state, conn } => {
            let state = state
                .map(|s| {
                    BreakerState::parse(&s).ok_or_else(|| anyhow!("--state: unknown state {s:?}"))
                })
                .transpose()?;
            let l = conn.client()?.breakers(state).await.map_err(e)?;
            if conn.json {
                return output::json(&l);
            }
            table(BREAKER_HEAD, &breaker_rows(&l.breakers));
        }
        BreakerCmd::Show { subject, conn } => {
            let b = conn.client()?.breaker(&subject).await.map_err(e)?;
            if conn.json {
                return output::json(&b);
            }
            table(BREAKER_HEAD, &breaker_rows(std::slice::from_ref(&b)));
            if !b.opened_by.is_null() {
                println!("\nopened by: {}", b.opened_by);
            }
        }
    }
    Ok(())
}

fn lease_rows(list: &[Lease]) -> Vec<Vec<String>> {
    list.iter()
        .map(|l| {
            vec![
                l.id.clone(),
                l.resource.clone(),
                l.mode.as_str().to_string(),
                l.holder.clone(),
                l.fence.to_string(),
                l.expires_at.to_rfc3339(),
                opt(&l.reason),
            ]
        })
        .collect()
}

const LEASE_HEAD: &[&str] = &[
    "ID", "RESOURCE", "MODE", "HOLDER", "FENCE", "EXPIRES", "REASON",
];

pub async fn lease(cmd: LeaseCmd) -> Result<()> {
    match cmd {
        LeaseCmd::Acquire {
            resource,
            shared,
            ttl_ms,
            reason,
            idempotency_key,
            conn,
        } => {
            let req = AcquireLeaseRequest {
                resource,
                mode: if shared {
                    LeaseMode::Shared
                } else {
                    LeaseMode::Exclusive
                },
                ttl_ms,
                reason,
                idempotency_key,
            };
            let env = conn.client()?.acquire_lease(&req).await.map_err(e)?;
            if conn.json {
                return output::json(&env);
            }
            table(LEASE_HEAD, &lease_rows(std::slice::from_ref(&env.lease)));
        }
        LeaseCmd::List {
            resource,
            holder,
            conn,
        } => {
            let l = conn
                .client()?
                .leases(resource.as_deref(), holder.as_deref())
                .await
                .map_err(e)?;
            if conn.json {
                return output::json(&l);
            }
            table(LEASE_HEAD, &lease_rows(&l.leases));
        }
        LeaseCmd::Release { id, force, conn } => {
            let l = conn.client()?.release_lease(&id, force).await.map_err(e)?;
            if conn.json {
                return output::json(&l);
            }
            println!("released {} ({})", l.id, l.resource);
        }
        LeaseCmd::Renew { id, ttl_ms, conn } => {
            let l = conn.client()?.renew_lease(&id, ttl_ms).await.map_err(e)?;
            if conn.json {
                return output::json(&l);
            }
            println!("{} now expires at {}", l.id, l.expires_at.to_rfc3339());
        }
        LeaseCmd::Check {
            paths,
            prefix,
            instance,
            conn,
        } => {
            let all = conn.client()?.leases(None, None).await.map_err(e)?.leases;
            let mut blocked = Vec::new();
            for p in &paths {
                let path = format!("{prefix}{p}");
                for l in &all {
                    if l.mode == LeaseMode::Exclusive
                        && instance.as_deref() != Some(l.holder.as_str())
                        && concord_core::lease::overlaps(&path, &l.resource)
                    {
                        blocked.push((path.clone(), l.clone()));
                    }
                }
            }
            if conn.json {
                output::json(
                    &serde_json::json!({"conflicts": blocked.iter().map(|(p, l)| serde_json::json!({"path": p, "lease": l})).collect::<Vec<_>>()}),
                )?;
            }
            if !blocked.is_empty() {
                for (p, l) in &blocked {
                    eprintln!(
                        "{p}: exclusively leased by {} ({}) until {}{}",
                        l.holder,
                        l.resource,
                        l.expires_at.to_rfc3339(),
                        l.reason
                            .as_ref()
                            .map(|r| format!(": {r}"))
                            .unwrap_or_default()
                    );
                }
                bail!("{} path(s) are leased by another instance", blocked.len());
            }
        }
    }
    Ok(())
}
