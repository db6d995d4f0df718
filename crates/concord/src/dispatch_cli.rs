//! `concord dispatch COMMAND JSON …`: one question to many agents, one answer.

use crate::cli::{e, parse_value, Conn};
use crate::output::{self, opt, table};
use anyhow::{anyhow, Result};
use clap::Args;
use concord_core::api::{
    DispatchRequest, DispatchSelect, IfUnderMin, Quorum, Reducer, ReducerKind, Role,
};

#[derive(Args)]
pub struct DispatchArgs {
    command: String,
    /// The payload (JSON; a bare word is a string).
    payload: String,
    /// Selector: entity=NAME, cap=CAPABILITY (repeatable), role=primary|secondary|fork (repeatable).
    #[arg(long = "select", value_delimiter = ',')]
    select: Vec<String>,
    /// single, multi or any.
    #[arg(long, default_value = "any")]
    quorum: String,
    #[arg(long)]
    min: Option<usize>,
    #[arg(long)]
    max: Option<usize>,
    /// first, all, majority, weighted_mean, fedavg, best_of, union.
    #[arg(long, default_value = "all")]
    reducer: String,
    /// JSON pointer for the reducer (e.g. /verdict).
    #[arg(long)]
    path: Option<String>,
    #[arg(long)]
    weight_path: Option<String>,
    #[arg(long)]
    score_path: Option<String>,
    #[arg(long)]
    key_path: Option<String>,
    /// fail, degraded or wait.
    #[arg(long, default_value = "fail")]
    if_under_min: String,
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: i64,
    #[arg(long)]
    idempotent: bool,
    #[command(flatten)]
    conn: Conn,
}

fn parse<T: serde::de::DeserializeOwned>(flag: &str, v: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(v.to_string()))
        .map_err(|_| anyhow!("--{flag}: unknown value {v:?}"))
}

pub async fn run(a: DispatchArgs) -> Result<()> {
    let mut select = DispatchSelect::default();
    let mut roles = Vec::new();
    for s in &a.select {
        match s.split_once('=') {
            Some(("entity", v)) => select.entity = Some(v.to_string()),
            Some(("cap", v)) => select.capabilities.push(v.to_string()),
            Some(("role", v)) => roles
                .push(Role::parse(v).ok_or_else(|| anyhow!("--select role={v}: unknown role"))?),
            _ => {
                return Err(anyhow!(
                    "--select {s:?}: use entity=NAME, cap=CAPABILITY or role=ROLE"
                ))
            }
        }
    }
    if !roles.is_empty() {
        select.roles = Some(roles);
    }
    let req = DispatchRequest {
        command: a.command,
        payload: parse_value(&a.payload),
        select,
        quorum: parse::<Quorum>("quorum", &a.quorum)?,
        min: a.min,
        max: a.max,
        timeout_ms: Some(a.timeout_ms),
        reducer: Some(Reducer {
            kind: parse::<ReducerKind>("reducer", &a.reducer)?,
            path: a.path,
            weight_path: a.weight_path,
            score_path: a.score_path,
            key_path: a.key_path,
        }),
        if_under_min: parse::<IfUnderMin>("if-under-min", &a.if_under_min)?,
        idempotent: a.idempotent,
        wait: Some(true),
    };
    let v = a.conn.client()?.dispatch(&req).await.map_err(e)?;
    if a.conn.json {
        return output::json(&v);
    }
    println!(
        "dispatch {} {}: {} of {} answered",
        v.id, v.state, v.responded, v.selected
    );
    println!(
        "result: {}",
        v.result
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "-".into())
    );
    let rows: Vec<Vec<String>> = v
        .peers
        .iter()
        .map(|p| {
            vec![
                p.instance.clone(),
                p.state.clone(),
                p.latency_ms
                    .map(|l| format!("{l} ms"))
                    .unwrap_or_else(|| "-".into()),
                p.result
                    .as_ref()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| opt(&p.error)),
            ]
        })
        .collect();
    println!();
    table(&["PEER", "STATE", "LATENCY", "RESULT"], &rows);
    Ok(())
}
