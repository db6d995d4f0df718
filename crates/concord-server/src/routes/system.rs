use crate::error::ApiResult;
use crate::extract::Caller;
use crate::AppState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use concord_core::api::{HubStatus, WhoAmI};
use concord_core::authz::{authorize, Action, Target};
use std::sync::Arc;

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "system", security(()), responses((status = 200, description = "ok")))]
pub(crate) async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// Readiness: the store answers.
#[utoipa::path(get, path = "/readyz", tag = "system", security(()),
    responses((status = 200, description = "ready"), (status = 503, description = "store unavailable")))]
pub(crate) async fn readyz(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    match s.store.now_ms().await {
        Ok(_) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ready", "backend": s.store.backend()})),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": "unavailable", "message": e.message})),
        ),
    }
}

/// A summary of the hub.
#[utoipa::path(get, path = "/v1/status", tag = "system", responses((status = 200, body = HubStatus)))]
pub(crate) async fn status(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
) -> ApiResult<axum::Json<HubStatus>> {
    authorize(&p, Action::StatusRead, Target::default())?;
    let entities = s.store.list_entities().await?;
    let ghosts = s.store.list_ghosts().await?;
    Ok(axum::Json(HubStatus {
        version: env!("CARGO_PKG_VERSION").to_string(),
        backend: s.store.backend().to_string(),
        hub_id: s.config.hub_id.clone(),
        uptime_ms: s.started.elapsed().as_millis() as u64,
        entities: entities.len() as u64,
        live_instances: entities.iter().map(|e| e.live_instances).sum(),
        ghosts: ghosts.len() as u64,
        last_event_seq: *s.store.watch_events().borrow(),
    }))
}

/// Who the caller's token makes it: kind, entity, instance.
#[utoipa::path(get, path = "/v1/whoami", tag = "system", responses((status = 200, body = WhoAmI)))]
pub(crate) async fn whoami(Caller(p): Caller) -> ApiResult<axum::Json<WhoAmI>> {
    authorize(&p, Action::WhoAmI, Target::default())?;
    Ok(axum::Json(WhoAmI {
        token_id: p.token_id,
        kind: p.kind,
        entity: p.entity,
        instance: p.instance,
    }))
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "system", security(()), responses((status = 200, description = "Prometheus text")))]
pub(crate) async fn metrics(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    let (streams, long_polls) = s.limits.open_counts();
    let gauges = [
        (
            "concord_event_subscribers",
            "Live event subscriptions (SSE streams and long-polls).",
            s.subscribers.get() as f64,
        ),
        (
            "concord_open_streams",
            "Open SSE event streams.",
            streams as f64,
        ),
        (
            "concord_open_long_polls",
            "Open long-polls.",
            long_polls as f64,
        ),
        (
            "concord_presence_instances",
            "Instances whose heartbeats this hub answers from memory.",
            s.presence.len() as f64,
        ),
        (
            "concord_uptime_seconds",
            "Seconds since this hub started.",
            s.started.elapsed().as_secs_f64(),
        ),
        (
            "concord_last_event_seq",
            "Newest event seq known to this hub.",
            *s.store.watch_events().borrow() as f64,
        ),
    ];
    let w = s.store.write_stats();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let counters = [
        (
            "concord_store_commits_total",
            "Write transactions this hub committed.",
            load(&w.commits) as f64,
        ),
        (
            "concord_store_committed_operations_total",
            "Operations those transactions carried (SQLite: a group commit carries many).",
            load(&w.operations) as f64,
        ),
        (
            "concord_store_busy_seconds_total",
            "Time in write transactions, BEGIN to the end of COMMIT. On SQLite its rate is the \
             writer thread's utilization: near 1, writes queue for it.",
            load(&w.busy_us) as f64 / 1e6,
        ),
        (
            "concord_store_commit_seconds_total",
            "Of that, time in COMMIT (the fsync with --durability full).",
            load(&w.commit_us) as f64 / 1e6,
        ),
    ];
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(&counters, &gauges),
    )
}

/// The OpenAPI document, generated from the handlers.
#[utoipa::path(get, path = "/openapi.json", tag = "system", security(()), responses((status = 200, description = "OpenAPI 3.1")))]
pub(crate) async fn openapi() -> impl IntoResponse {
    axum::Json(crate::openapi::document())
}
