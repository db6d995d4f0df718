use super::instances::deny_ghost;
use crate::error::ApiResult;
use crate::extract::{Caller, Json, Query};
use crate::AppState;
use axum::extract::{Path, State};
use concord_core::api::{Deleted, PutStateRequest, StateEntry, StateList};
use concord_core::authz::{authorize, Action, Target};
use concord_core::validate::{self, MAX_STATE_VALUE_BYTES};
use concord_core::Error;
use concord_store::{StateDelete, StateWrite};
use serde::Deserialize;
use std::sync::Arc;

/// All state keys of an entity.
#[utoipa::path(get, path = "/v1/entities/{entity}/state", tag = "state",
    params(("entity" = String, Path)), responses((status = 200, body = StateList)))]
pub(crate) async fn list(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(entity): Path<String>,
) -> ApiResult<axum::Json<StateList>> {
    validate::name("entity", &entity)?;
    authorize(
        &p,
        Action::StateRead,
        Target {
            entity: Some(&entity),
            instance: None,
        },
    )?;
    let entries = s.store.list_state(&entity).await?;
    Ok(axum::Json(StateList { entity, entries }))
}

/// One state key.
#[utoipa::path(get, path = "/v1/entities/{entity}/state/{key}", tag = "state",
    params(("entity" = String, Path), ("key" = String, Path)), responses((status = 200, body = StateEntry)))]
pub(crate) async fn get(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path((entity, key)): Path<(String, String)>,
) -> ApiResult<axum::Json<StateEntry>> {
    validate::name("entity", &entity)?;
    validate::state_key("key", &key)?;
    authorize(
        &p,
        Action::StateRead,
        Target {
            entity: Some(&entity),
            instance: None,
        },
    )?;
    let entry = s
        .store
        .get_state(&entity, &key)
        .await?
        .ok_or_else(|| Error::not_found(format!("{entity} has no state key {key}")))?;
    Ok(axum::Json(entry))
}

/// Write a state key: only the current primary with its current fence, or admin.
#[utoipa::path(put, path = "/v1/entities/{entity}/state/{key}", tag = "state", request_body = PutStateRequest,
    params(("entity" = String, Path), ("key" = String, Path)), responses((status = 200, body = StateEntry)))]
pub(crate) async fn put(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path((entity, key)): Path<(String, String)>,
    Json(req): Json<PutStateRequest>,
) -> ApiResult<axum::Json<StateEntry>> {
    validate::name("entity", &entity)?;
    validate::state_key("key", &key)?;
    validate::json_size("value", &req.value, MAX_STATE_VALUE_BYTES)?;
    authorize(
        &p,
        Action::StateWrite,
        Target {
            entity: Some(&entity),
            instance: None,
        },
    )?;
    deny_ghost(&s, &p).await?;
    let entry = s
        .store
        .put_state(StateWrite {
            entity,
            key,
            value: req.value,
            fence: req.fence,
            if_revision: req.if_revision,
            actor: p,
        })
        .await?;
    Ok(axum::Json(entry))
}

#[derive(Debug, Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeleteQuery {
    #[serde(default, deserialize_with = "concord_core::fencing::deserialize_fence")]
    fence: Option<u64>,
    if_revision: Option<i64>,
}

/// Delete a state key (fenced like a write). `fence` and `if_revision` in the query.
#[utoipa::path(delete, path = "/v1/entities/{entity}/state/{key}", tag = "state",
    params(("entity" = String, Path), ("key" = String, Path), DeleteQuery), responses((status = 200, body = Deleted)))]
pub(crate) async fn delete(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path((entity, key)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<axum::Json<Deleted>> {
    validate::name("entity", &entity)?;
    validate::state_key("key", &key)?;
    authorize(
        &p,
        Action::StateWrite,
        Target {
            entity: Some(&entity),
            instance: None,
        },
    )?;
    deny_ghost(&s, &p).await?;
    let deleted = s
        .store
        .delete_state(StateDelete {
            entity,
            key,
            fence: q.fence,
            if_revision: q.if_revision,
            actor: p,
        })
        .await?;
    Ok(axum::Json(Deleted { deleted }))
}
