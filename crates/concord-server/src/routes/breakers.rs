//! Observations and shared circuit breakers (DESIGN §8). The rules are
//! `concord_core::breaker`; the policies come from the serve flags
//! (`HubConfig::breakers`); provenance and time come from the hub, never the body.

use super::instances::require_labelled;
use crate::error::ApiResult;
use crate::extract::{parse_json, Caller, Json, Query};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use concord_core::api::{
    BreakerList, BreakerState, BreakerView, ObservationBatch, ObservationRequest, Observed,
    ProbeResponse,
};
use concord_core::authz::{authorize, Action, Principal, Target};
use concord_core::breaker::{self, Sample, MAX_BATCH};
use concord_core::idempotency;
use concord_core::Error;
use concord_store::{NewObservation, Prober};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

fn own(p: &Principal) -> Target<'_> {
    Target {
        entity: p.entity.as_deref(),
        instance: p.instance.as_deref(),
    }
}

/// Report outcomes of calls to a subject: one observation or `{"observations": […]}`.
#[utoipa::path(post, path = "/v1/observations", tag = "breakers", request_body = ObservationRequest,
    responses((status = 202, body = Observed)))]
pub(crate) async fn observe(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Json(body): Json<Value>,
) -> ApiResult<(StatusCode, axum::Json<Observed>)> {
    authorize(&p, Action::Observe, own(&p))?;
    let bytes = serde_json::to_vec(&body).map_err(|e| Error::internal(format!("body: {e}")))?;
    let (reqs, batch) = if body.get("observations").is_some() {
        (parse_json::<ObservationBatch>(&bytes)?.observations, true)
    } else {
        (vec![parse_json::<ObservationRequest>(&bytes)?], false)
    };
    if reqs.is_empty() || reqs.len() > MAX_BATCH {
        return Err(
            Error::bad_field("observations", format!("must hold 1..={MAX_BATCH} items")).into(),
        );
    }
    let mut checked = Vec::with_capacity(reqs.len());
    for (i, r) in reqs.iter().enumerate() {
        let prefix = if batch {
            format!("observations[{i}].")
        } else {
            String::new()
        };
        checked.push(breaker::validate_observation(r, &prefix)?);
    }
    let inst = require_labelled(&s, &p)
        .await?
        .ok_or_else(|| Error::forbidden("observations come from instance sessions"))?;
    // Per writer, so one instance cannot flood a window (or flip a breaker) alone.
    s.limits.observe(&inst.id, reqs.len())?;
    let obs = reqs
        .into_iter()
        .zip(checked)
        .map(|(r, outcome)| NewObservation {
            subject: r.subject,
            sample: Sample {
                outcome,
                latency_ms: r.latency_ms,
                instance: inst.id.clone(),
                entity: Some(inst.entity.clone()),
                host: inst.host.clone(),
                detail: r.detail,
                probe_id: r.probe_id,
                at: 0,
            },
            token: p.token_id.clone(),
            idempotency: r.idempotency_key.map(|k| (idempotency::scope(&p), k)),
        })
        .collect::<Vec<_>>();
    let accepted = obs.len();
    let deduplicated = s.store.observe(obs, &s.config.breakers).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(Observed {
            accepted,
            deduplicated,
        }),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    /// closed, open or half_open.
    state: Option<BreakerState>,
}

/// Every breaker the hub knows, optionally in one state.
#[utoipa::path(get, path = "/v1/breakers", tag = "breakers", params(ListQuery),
    responses((status = 200, body = BreakerList)))]
pub(crate) async fn list(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Query(q): Query<ListQuery>,
) -> ApiResult<axum::Json<BreakerList>> {
    authorize(&p, Action::BreakerRead, Target::default())?;
    let breakers = s.store.list_breakers(q.state, &s.config.breakers).await?;
    Ok(axum::Json(BreakerList { breakers }))
}

/// One subject's breaker: state, window statistics and who tripped it.
#[utoipa::path(get, path = "/v1/breakers/{subject}", tag = "breakers", params(("subject" = String, Path)),
    responses((status = 200, body = BreakerView)))]
pub(crate) async fn get(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(subject): Path<String>,
) -> ApiResult<axum::Json<BreakerView>> {
    authorize(&p, Action::BreakerRead, Target::default())?;
    breaker::validate_subject("subject", &subject)?;
    let v = s
        .store
        .get_breaker(&subject, &s.config.breakers)
        .await?
        .ok_or_else(|| Error::not_found(format!("no observations of {subject}")))?;
    Ok(axum::Json(v))
}

/// Ask for the half-open probe: granted to one caller at a time, fleet-wide.
#[utoipa::path(post, path = "/v1/breakers/{subject}/probe", tag = "breakers", params(("subject" = String, Path)),
    responses((status = 200, body = ProbeResponse)))]
pub(crate) async fn probe(
    s: Arc<AppState>,
    p: Principal,
    subject: String,
) -> ApiResult<axum::Json<ProbeResponse>> {
    authorize(&p, Action::BreakerProbe, own(&p))?;
    breaker::validate_subject("subject", &subject)?;
    let inst = require_labelled(&s, &p)
        .await?
        .ok_or_else(|| Error::forbidden("probes are granted to instance sessions"))?;
    let r = s
        .store
        .probe_breaker(
            &subject,
            &s.config.breakers,
            Prober {
                instance: inst.id,
                entity: Some(inst.entity),
                token: p.token_id.clone(),
            },
        )
        .await?;
    Ok(axum::Json(r))
}

/// `/v1/breakers/{*rest}`: subjects contain slashes (`provider:kimi/k2p5`), so one
/// wildcard route serves both a subject and its `/probe`.
pub(crate) async fn get_any(
    state: State<Arc<AppState>>,
    caller: Caller,
    Path(rest): Path<String>,
) -> ApiResult<axum::Json<BreakerView>> {
    get(state, caller, Path(rest)).await
}

pub(crate) async fn post_any(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(rest): Path<String>,
) -> Result<axum::Json<ProbeResponse>, axum::response::Response> {
    match rest.strip_suffix("/probe") {
        Some(subject) => probe(s, p, subject.to_string())
            .await
            .map_err(IntoResponse::into_response),
        None => Err(method_not_allowed(Path(rest)).await),
    }
}

/// Subjects may contain '/', so one wildcard route serves both
/// `GET /v1/breakers/{subject}` and `POST /v1/breakers/{subject}/probe`; the
/// methods a path allows depend on its shape: a path ending in `/probe` is both a
/// subject (GET) and a probe (POST), any other only a subject.
pub(crate) async fn method_not_allowed(Path(rest): Path<String>) -> axum::response::Response {
    let allow = if rest.ends_with("/probe") {
        "GET,HEAD,POST"
    } else {
        "GET,HEAD"
    };
    let err = crate::error::ApiError(Error::new(
        concord_core::ErrorCode::MethodNotAllowed,
        "method not allowed on this route (the Allow header lists those that are)",
    ));
    ([(axum::http::header::ALLOW, allow)], err).into_response()
}
