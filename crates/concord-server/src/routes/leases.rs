//! Resource leases (DESIGN §8): exclusive or shared, on names or path globs, held
//! by the caller's instance and gone with it. Overlap rules: `concord_core::lease`.

use super::instances::require_labelled;
use crate::error::ApiResult;
use crate::extract::{Caller, Json, OptionalJson, Query};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use concord_core::api::{AcquireLeaseRequest, LeaseEnvelope, LeaseList, RenewLeaseRequest};
use concord_core::authz::{authorize, Action, Principal, Target};
use concord_core::lease::{self, DEFAULT_TTL_MS, MAX_REASON_LEN};
use concord_core::{ids, Error};
use concord_store::{LeaseFilter, NewLease};
use serde::Deserialize;
use std::sync::Arc;

fn own(p: &Principal) -> Target<'_> {
    Target {
        entity: p.entity.as_deref(),
        instance: p.instance.as_deref(),
    }
}

fn holder(p: &Principal) -> Result<&str, Error> {
    p.instance
        .as_deref()
        .ok_or_else(|| Error::forbidden("leases are held by instances: use a session token"))
}

fn check(req: &AcquireLeaseRequest) -> Result<(String, i64), Error> {
    let resource = lease::validate_resource("resource", &req.resource)?;
    let ttl = req.ttl_ms.unwrap_or(DEFAULT_TTL_MS);
    lease::validate_ttl("ttl_ms", ttl)?;
    if let Some(r) = &req.reason {
        if r.len() > MAX_REASON_LEN {
            return Err(Error::bad_field(
                "reason",
                format!("must be at most {MAX_REASON_LEN} bytes"),
            ));
        }
        if r.chars().any(char::is_control) {
            return Err(Error::bad_field(
                "reason",
                "must not contain control characters",
            ));
        }
    }
    if let Some(k) = &req.idempotency_key {
        if k.is_empty() || k.len() > 256 {
            return Err(Error::bad_field("idempotency_key", "must be 1..=256 bytes"));
        }
    }
    Ok((resource, ttl))
}

/// Acquire a lease for the calling instance, or 409 `lease_conflict` naming the holders.
#[utoipa::path(post, path = "/v1/leases", tag = "leases", request_body = AcquireLeaseRequest,
    responses((status = 201, body = LeaseEnvelope)))]
pub(crate) async fn acquire(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Json(req): Json<AcquireLeaseRequest>,
) -> ApiResult<(StatusCode, axum::Json<LeaseEnvelope>)> {
    let (resource, ttl_ms) = check(&req)?;
    authorize(&p, Action::LeaseAcquire, own(&p))?;
    let holder = holder(&p)?.to_string();
    require_labelled(&s, &p).await?;
    let (lease, deduplicated) = s
        .store
        .acquire_lease(NewLease {
            id: ids::new_id(ids::LEASE),
            resource,
            mode: req.mode,
            ttl_ms,
            reason: req.reason,
            idempotency_key: req.idempotency_key,
            holder,
            entity: p.entity.clone(),
            token: p.token_id.clone(),
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(LeaseEnvelope {
            lease,
            deduplicated,
        }),
    ))
}

/// Extend the caller's lease to now + ttl_ms (default 600000).
#[utoipa::path(post, path = "/v1/leases/{id}/renew", tag = "leases", params(("id" = String, Path)),
    request_body = RenewLeaseRequest, responses((status = 200, body = LeaseEnvelope)))]
pub(crate) async fn renew(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
    OptionalJson(req): OptionalJson<Option<RenewLeaseRequest>>,
) -> ApiResult<axum::Json<LeaseEnvelope>> {
    let ttl = req.and_then(|r| r.ttl_ms).unwrap_or(DEFAULT_TTL_MS);
    lease::validate_ttl("ttl_ms", ttl)?;
    authorize(&p, Action::LeaseAcquire, own(&p))?;
    require_labelled(&s, &p).await?;
    let lease = s.store.renew_lease(&id, holder(&p)?, ttl).await?;
    Ok(axum::Json(LeaseEnvelope {
        lease,
        deduplicated: false,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReleaseQuery {
    /// Admin only: release whoever holds it.
    #[serde(default)]
    force: bool,
}

/// Release a lease: the holder, or an admin with `?force=true`.
#[utoipa::path(delete, path = "/v1/leases/{id}", tag = "leases", params(("id" = String, Path), ReleaseQuery),
    responses((status = 200, body = LeaseEnvelope)))]
pub(crate) async fn release(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
    Query(q): Query<ReleaseQuery>,
) -> ApiResult<axum::Json<LeaseEnvelope>> {
    let lease = if q.force {
        authorize(&p, Action::LeaseForceRelease, Target::default())?;
        s.store.release_lease(&id, None, &p).await?
    } else {
        authorize(&p, Action::LeaseRelease, own(&p))?;
        s.store.release_lease(&id, Some(holder(&p)?), &p).await?
    };
    Ok(axum::Json(LeaseEnvelope {
        lease,
        deduplicated: false,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    /// Leases overlapping this name or glob.
    resource: Option<String>,
    /// Leases of this instance.
    holder: Option<String>,
}

/// Live leases (held, unexpired, holder live), oldest first.
#[utoipa::path(get, path = "/v1/leases", tag = "leases", params(ListQuery),
    responses((status = 200, body = LeaseList)))]
pub(crate) async fn list(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Query(q): Query<ListQuery>,
) -> ApiResult<axum::Json<LeaseList>> {
    authorize(&p, Action::LeaseRead, Target::default())?;
    let resource = q
        .resource
        .map(|r| lease::validate_resource("resource", &r))
        .transpose()?;
    if let Some(h) = &q.holder {
        if !ids::has_prefix(h, ids::INSTANCE) {
            return Err(Error::bad_field("holder", "must be an instance id (ins_…)").into());
        }
    }
    let leases = s
        .store
        .list_leases(LeaseFilter {
            resource,
            holder: q.holder,
        })
        .await?;
    Ok(axum::Json(LeaseList { leases }))
}
