use super::instances::require_labelled;
use crate::dispatch::{candidates, evaluate, fan_out, may_change, peer_queue, peer_task};
use crate::error::ApiResult;
use crate::extract::{Caller, Json};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use concord_core::api::{DispatchRequest, DispatchView};
use concord_core::authz::{authorize, Action, Target};
use concord_core::dispatch::{IfUnderMin, Quorum};
use concord_core::validate::{self, json_size};
use concord_core::{ids, Error, ErrorCode};
use concord_store::NewDispatch;
use std::sync::Arc;
use std::time::Duration;

fn check(req: &DispatchRequest) -> Result<(), Error> {
    validate::name("command", &req.command)?;
    json_size(
        "payload",
        &req.payload,
        crate::routes::tasks::MAX_PAYLOAD_BYTES,
    )?;
    if let Some(e) = &req.select.entity {
        validate::name("select.entity", e)?;
    }
    validate::capabilities("select.capabilities", &req.select.capabilities)?;
    let t = req.timeout_ms.unwrap_or(30_000);
    if !(100..=3_600_000).contains(&t) {
        return Err(Error::bad_field(
            "timeout_ms",
            "must be between 100 and 3600000",
        ));
    }
    if let (Some(min), Some(max)) = (req.min, req.max) {
        if min > max {
            return Err(Error::bad_field(
                "min",
                format!("min {min} is greater than max {max}"),
            ));
        }
    }
    if req.min == Some(0) || req.max == Some(0) {
        return Err(Error::bad_field(
            if req.min == Some(0) { "min" } else { "max" },
            "must be at least 1",
        ));
    }
    if req.quorum == Quorum::Multi && req.min.is_none() && req.max.is_none() {
        return Err(Error::bad_field(
            "min",
            "a multi quorum needs min and/or max",
        ));
    }
    if let Some(r) = &req.reducer {
        r.validate()?;
    }
    Ok(())
}

/// Send one command to many agents and get one answer back.
#[utoipa::path(post, path = "/v1/dispatch", tag = "dispatch", request_body = DispatchRequest,
    responses((status = 200, body = DispatchView), (status = 201, body = DispatchView, description = "wait: false")))]
pub(crate) async fn create(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Json(req): Json<DispatchRequest>,
) -> ApiResult<(StatusCode, axum::Json<DispatchView>)> {
    check(&req)?;
    authorize(
        &p,
        Action::Dispatch,
        Target {
            entity: p.entity.as_deref(),
            instance: p.instance.as_deref(),
        },
    )?;
    require_labelled(&s, &p).await?;
    let found = candidates(&s, &req, &[]).await?;
    if found.is_empty() && req.if_under_min == IfUnderMin::Fail {
        return Err(
            Error::new(ErrorCode::NoPeers, "no live instance matches the selector")
                .with_details(serde_json::to_value(&req.select).unwrap_or_default())
                .into(),
        );
    }
    let now = s.store.now_ms().await?;
    let deadline = now + req.timeout_ms.unwrap_or(30_000);
    let id = ids::new_id(ids::DISPATCH);
    let peers = found
        .into_iter()
        .take(fan_out(&req))
        .map(|i| {
            let t = peer_task(&id, &req, &i.id, deadline, now);
            (i.id, t)
        })
        .collect();
    let wait = req.wait.unwrap_or(true);
    let spec = serde_json::to_value(&req).map_err(|e| Error::internal(format!("spec: {e}")))?;
    s.store
        .create_dispatch(NewDispatch {
            id: id.clone(),
            command: req.command.clone(),
            spec,
            deadline_ms: deadline,
            peers,
            token: p.token_id.clone(),
        })
        .await?;
    if !wait {
        return Ok((StatusCode::CREATED, axum::Json(evaluate(&s, &id).await?)));
    }
    let mut rx = s.bus.subscribe();
    let queue = peer_queue(&req.command);
    let until =
        tokio::time::Instant::now() + Duration::from_millis((deadline - now).max(0) as u64 + 50);
    loop {
        let v = evaluate(&s, &id).await?;
        if v.state != "running" || tokio::time::Instant::now() >= until {
            return Ok((StatusCode::OK, axum::Json(v)));
        }
        // Re-evaluate on changes that may move the verdict, or at least every
        // 250 ms; events that arrived together make one evaluation.
        let recheck = (tokio::time::Instant::now() + Duration::from_millis(250)).min(until);
        loop {
            match tokio::time::timeout_at(recheck, rx.recv()).await {
                Err(_) | Ok(Err(_)) => break,
                Ok(Ok(e)) if may_change(&e, &queue) => break,
                Ok(Ok(_)) => {}
            }
        }
        while rx.try_recv().is_ok() {}
    }
}

/// A dispatch's state, answer and per-peer results.
#[utoipa::path(get, path = "/v1/dispatch/{id}", tag = "dispatch", params(("id" = String, Path)),
    responses((status = 200, body = DispatchView)))]
pub(crate) async fn get(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<DispatchView>> {
    authorize(&p, Action::TaskRead, Target::default())?;
    Ok(axum::Json(evaluate(&s, &id).await?))
}
