use crate::error::ApiResult;
use crate::extract::{Caller, Json, Query};
use crate::presence::Beat;
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use concord_core::api::{
    GhostList, HeartbeatResponse, Instance, InstanceEnvelope, InstanceList, InstanceState,
    PatchInstanceRequest, RegisterInstanceRequest, Registered, Role,
};
use concord_core::authz::{authorize, Action, Principal, Target};
use concord_core::token::{generate_secret, hash_secret, TokenKind};
use concord_core::{ids, validate, Error};
use concord_store::{InstanceFilter, NewInstance};
use serde::Deserialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Register a running instance of an entity. Returns its session token.
#[utoipa::path(post, path = "/v1/instances", tag = "instances", request_body = RegisterInstanceRequest,
    responses((status = 201, body = Registered)))]
pub(crate) async fn register(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Json(req): Json<RegisterInstanceRequest>,
) -> ApiResult<(StatusCode, axum::Json<Registered>)> {
    let ttl_ms = validate::registration(&req)?;
    authorize(
        &p,
        Action::InstanceRegister,
        Target {
            entity: Some(&req.entity),
            instance: None,
        },
    )?;
    let secret = generate_secret();
    let session_token_id = ids::new_id(ids::TOKEN);
    let session_hash = hash_secret(&secret);
    let reg = s
        .store
        .register_instance(NewInstance {
            id: ids::new_id(ids::INSTANCE),
            request: req,
            ttl_ms,
            session_token_id: session_token_id.clone(),
            session_secret_hash: session_hash.clone(),
            owner: s.config.hub_id.clone(),
            registered_by: p.token_id.clone(),
            max_live_per_entity: s.config.max_instances_per_entity,
        })
        .await?;
    s.presence
        .registered(&reg.instance, reg.epoch, reg.fence.is_some(), s.now_ms());
    s.auth.remember(
        session_hash,
        Principal {
            token_id: session_token_id,
            kind: TokenKind::Session,
            entity: Some(reg.instance.entity.clone()),
            instance: Some(reg.instance.id.clone()),
        },
    );
    Ok((
        StatusCode::CREATED,
        axum::Json(Registered {
            instance: reg.instance,
            session_token: secret,
            fence: reg.fence,
        }),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    entity: Option<String>,
    role: Option<Role>,
    /// `live` (default), `expired`, `closed` or `all`.
    state: Option<String>,
}

/// List instances (live by default).
#[utoipa::path(get, path = "/v1/instances", tag = "instances", params(ListQuery),
    responses((status = 200, body = InstanceList)))]
pub(crate) async fn list(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Query(q): Query<ListQuery>,
) -> ApiResult<axum::Json<InstanceList>> {
    authorize(
        &p,
        Action::InstanceRead,
        Target {
            entity: q.entity.as_deref(),
            instance: None,
        },
    )?;
    let state = match q.state.as_deref() {
        None | Some("live") => Some(InstanceState::Live),
        Some("all") => None,
        Some(other) => Some(InstanceState::parse(other).ok_or_else(|| {
            Error::bad_field(
                "state",
                format!("{other:?} is not one of live, expired, closed, all"),
            )
        })?),
    };
    let mut instances = s
        .store
        .list_instances(InstanceFilter {
            entity: q.entity,
            role: q.role,
            state,
        })
        .await?;
    instances.iter_mut().for_each(|i| s.presence.overlay(i));
    Ok(axum::Json(InstanceList { instances }))
}

async fn load(s: &AppState, id: &str) -> ApiResult<Instance> {
    let mut inst = s
        .store
        .get_instance(id)
        .await?
        .ok_or_else(|| Error::not_found(format!("no instance {id}")))?;
    s.presence.overlay(&mut inst);
    Ok(inst)
}

fn target<'a>(i: &'a Instance) -> Target<'a> {
    Target {
        entity: Some(&i.entity),
        instance: Some(&i.id),
    }
}

/// One instance, in any state.
#[utoipa::path(get, path = "/v1/instances/{id}", tag = "instances",
    params(("id" = String, Path)), responses((status = 200, body = InstanceEnvelope)))]
pub(crate) async fn get(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<InstanceEnvelope>> {
    let inst = load(&s, &id).await?;
    authorize(&p, Action::InstanceRead, target(&inst))?;
    Ok(axum::Json(InstanceEnvelope { instance: inst }))
}

/// Label an instance (a ghost stops being one), or update its capabilities, endpoint, meta.
#[utoipa::path(patch, path = "/v1/instances/{id}", tag = "instances", request_body = PatchInstanceRequest,
    params(("id" = String, Path)), responses((status = 200, body = InstanceEnvelope)))]
pub(crate) async fn patch(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
    Json(req): Json<PatchInstanceRequest>,
) -> ApiResult<axum::Json<InstanceEnvelope>> {
    validate::patch(&req)?;
    let inst = load(&s, &id).await?;
    authorize(&p, Action::InstanceUpdate, target(&inst))?;
    let mut inst = s.store.update_instance(&id, req).await?;
    s.presence.overlay(&mut inst);
    Ok(axum::Json(InstanceEnvelope { instance: inst }))
}

/// Close an instance at once: its primary role is released.
#[utoipa::path(delete, path = "/v1/instances/{id}", tag = "instances",
    params(("id" = String, Path)), responses((status = 200, body = InstanceEnvelope)))]
pub(crate) async fn close(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<InstanceEnvelope>> {
    let inst = load(&s, &id).await?;
    authorize(&p, Action::InstanceClose, target(&inst))?;
    let closed = s.store.close_instance(&id, &p).await?;
    s.presence.remove(&id);
    s.presence.primary_released(&closed.entity, &closed.id);
    s.primary_released.send_modify(|v| *v += 1);
    Ok(axum::Json(InstanceEnvelope { instance: closed }))
}

/// Heartbeat (the instance's session token). Answered from memory in the common case.
#[utoipa::path(post, path = "/v1/instances/{id}/heartbeat", tag = "instances",
    params(("id" = String, Path)), responses((status = 200, body = HeartbeatResponse)))]
pub(crate) async fn heartbeat(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<HeartbeatResponse>> {
    authorize(
        &p,
        Action::InstanceHeartbeat,
        Target {
            entity: None,
            instance: Some(&id),
        },
    )?;
    let now = s.now_ms();
    if let Beat::Answered(r) = s.presence.beat(&id, now) {
        s.metrics.heartbeats_memory.fetch_add(1, Ordering::Relaxed);
        return Ok(axum::Json(r));
    }
    s.metrics.heartbeats_durable.fetch_add(1, Ordering::Relaxed);
    match s.store.heartbeat(&id, &s.config.hub_id).await {
        Ok(hb) => Ok(axum::Json(s.presence.after_durable(&hb, now))),
        Err(e) => {
            s.presence.remove(&id);
            Err(e.into())
        }
    }
}

/// Ghosts: unlabelled secondaries and forks, and heartbeats from unknown,
/// expired or closed instances.
#[utoipa::path(get, path = "/v1/ghosts", tag = "instances", responses((status = 200, body = GhostList)))]
pub(crate) async fn ghosts(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
) -> ApiResult<axum::Json<GhostList>> {
    authorize(&p, Action::GhostRead, Target::default())?;
    Ok(axum::Json(GhostList {
        ghosts: s.store.list_ghosts().await?,
    }))
}

/// Ghosts are denied every write outside their own instance until labelled.
/// Returns the caller's instance when the caller is a session.
pub(crate) async fn require_labelled(s: &AppState, p: &Principal) -> ApiResult<Option<Instance>> {
    let Some(id) = &p.instance else {
        return Ok(None);
    };
    let inst = s
        .store
        .get_instance(id)
        .await?
        .ok_or_else(|| Error::unknown_instance(id))?;
    inst.refuse_unless_writer()?;
    Ok(Some(inst))
}

/// The ghost rule alone, for fenced writes: an unlabelled secondary or fork may
/// not write shared state; whether the writer is still live and primary is the
/// store's fencing check, which answers `fenced` (not `unknown_instance`) so a
/// stale primary learns exactly why.
pub(crate) async fn deny_ghost(s: &AppState, p: &Principal) -> ApiResult<()> {
    let Some(id) = &p.instance else { return Ok(()) };
    if let Some(inst) = s.store.get_instance(id).await? {
        inst.refuse_ghost()?;
    }
    Ok(())
}
