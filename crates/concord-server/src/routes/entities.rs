use super::instances::{deny_ghost, require_labelled};
use crate::error::ApiResult;
use crate::extract::{Caller, Json, OptionalJson};
use crate::AppState;
use axum::extract::{Path, State};
use concord_core::api::{
    CampaignRequest, EntityDetail, EntityList, PrimaryGrant, ResignRequest, Resigned,
    RouteResponse, TransferRequest,
};
use concord_core::authz::{authorize, Action, Target};
use concord_core::{validate, Error, ErrorCode};
use std::sync::Arc;
use std::time::Duration;

/// Longest a campaign may block.
const MAX_CAMPAIGN_WAIT_MS: u64 = 300_000;

/// Every entity with its epoch, primary and live instance count.
#[utoipa::path(get, path = "/v1/entities", tag = "entities", responses((status = 200, body = EntityList)))]
pub(crate) async fn list(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
) -> ApiResult<axum::Json<EntityList>> {
    authorize(&p, Action::EntityRead, Target::default())?;
    Ok(axum::Json(EntityList {
        entities: s.store.list_entities().await?,
    }))
}

/// One entity: epoch, live primary and live instances.
#[utoipa::path(get, path = "/v1/entities/{entity}", tag = "entities",
    params(("entity" = String, Path)), responses((status = 200, body = EntityDetail)))]
pub(crate) async fn get(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(entity): Path<String>,
) -> ApiResult<axum::Json<EntityDetail>> {
    validate::name("entity", &entity)?;
    authorize(
        &p,
        Action::EntityRead,
        Target {
            entity: Some(&entity),
            instance: None,
        },
    )?;
    let mut detail = s
        .store
        .get_entity(&entity)
        .await?
        .ok_or_else(|| Error::not_found(format!("no entity {entity}")))?;
    detail
        .instances
        .iter_mut()
        .for_each(|i| s.presence.overlay(i));
    if let Some(p) = detail.primary.as_mut() {
        s.presence.overlay(p);
    }
    Ok(axum::Json(detail))
}

/// Campaign for the primary role; with `wait_ms`, block until it is free (like etcd).
#[utoipa::path(post, path = "/v1/entities/{entity}/primary", tag = "entities", request_body = CampaignRequest,
    params(("entity" = String, Path)), responses((status = 200, body = PrimaryGrant)))]
pub(crate) async fn campaign(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(entity): Path<String>,
    Json(req): Json<CampaignRequest>,
) -> ApiResult<axum::Json<PrimaryGrant>> {
    validate::name("entity", &entity)?;
    let wait_ms = req.wait_ms.unwrap_or(0);
    if wait_ms > MAX_CAMPAIGN_WAIT_MS {
        return Err(Error::bad_field("wait_ms", format!("at most {MAX_CAMPAIGN_WAIT_MS}")).into());
    }
    authorize(
        &p,
        Action::PrimaryCampaign,
        Target {
            entity: Some(&entity),
            instance: Some(&req.instance),
        },
    )?;
    require_labelled(&s, &p).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    let mut released = s.primary_released.subscribe();
    loop {
        released.borrow_and_update();
        match s.store.campaign(&entity, &req.instance).await {
            Ok(grant) => {
                s.presence
                    .set_entity(&entity, grant.epoch, Some(grant.instance.clone()));
                return Ok(axum::Json(grant));
            }
            Err(e)
                if e.code == ErrorCode::PrimaryHeld && tokio::time::Instant::now() < deadline =>
            {
                // Wake when some primary is released, or re-check now and then: the
                // holder may expire on another replica without this one hearing.
                let recheck = Duration::from_millis(250);
                let _ = tokio::time::timeout_at(
                    deadline.min(tokio::time::Instant::now() + recheck),
                    released.changed(),
                )
                .await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The primary steps down and stays live as a secondary.
#[utoipa::path(post, path = "/v1/entities/{entity}/primary/resign", tag = "entities", request_body = ResignRequest,
    params(("entity" = String, Path)), responses((status = 200, body = Resigned)))]
pub(crate) async fn resign(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(entity): Path<String>,
    OptionalJson(req): OptionalJson<ResignRequest>,
) -> ApiResult<axum::Json<Resigned>> {
    validate::name("entity", &entity)?;
    authorize(
        &p,
        Action::PrimaryResign,
        Target {
            entity: Some(&entity),
            instance: None,
        },
    )?;
    deny_ghost(&s, &p).await?;
    let who = if p.is_admin() {
        req.instance.clone()
    } else {
        if req.instance.is_some() && req.instance != p.instance {
            return Err(Error::forbidden("an instance can only resign itself").into());
        }
        p.instance.clone()
    };
    let r = s.store.resign(&entity, who.as_deref()).await?;
    s.presence.primary_released(&entity, &r.instance);
    s.primary_released.send_modify(|v| *v += 1);
    Ok(axum::Json(r))
}

/// Atomic handover of the primary role to a named live instance (new epoch).
#[utoipa::path(post, path = "/v1/entities/{entity}/primary/transfer", tag = "entities", request_body = TransferRequest,
    params(("entity" = String, Path)), responses((status = 200, body = PrimaryGrant)))]
pub(crate) async fn transfer(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(entity): Path<String>,
    Json(req): Json<TransferRequest>,
) -> ApiResult<axum::Json<PrimaryGrant>> {
    validate::name("entity", &entity)?;
    authorize(
        &p,
        Action::PrimaryTransfer,
        Target {
            entity: Some(&entity),
            instance: None,
        },
    )?;
    deny_ghost(&s, &p).await?;
    let from = if p.is_admin() {
        None
    } else {
        p.instance.as_deref()
    };
    let grant = s.store.transfer(&entity, from, &req.to).await?;
    s.presence
        .set_entity(&entity, grant.epoch, Some(grant.instance.clone()));
    Ok(axum::Json(grant))
}

/// Resolve `entity` to its live primary, or `entity:version` to a live instance of that version.
#[utoipa::path(get, path = "/v1/route/{target}", tag = "entities",
    params(("target" = String, Path, description = "`entity` or `entity:version`")),
    responses((status = 200, body = RouteResponse)))]
pub(crate) async fn route(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(target): Path<String>,
) -> ApiResult<axum::Json<RouteResponse>> {
    let (entity, version) = match target.split_once(':') {
        Some((e, v)) => (e, Some(v)),
        None => (target.as_str(), None),
    };
    validate::name("entity", entity)?;
    if let Some(v) = version {
        validate::name("version", v)?;
    }
    authorize(
        &p,
        Action::Route,
        Target {
            entity: Some(entity),
            instance: None,
        },
    )?;
    let mut inst = s.store.route(entity, version).await?.ok_or_else(|| {
        Error::not_found(match version {
            Some(v) => format!("no live instance of {entity} at version {v}"),
            None => format!("{entity} has no live primary"),
        })
    })?;
    s.presence.overlay(&mut inst);
    Ok(axum::Json(RouteResponse { instance: inst }))
}
