use crate::error::ApiResult;
use crate::extract::{Caller, Json};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use concord_core::api::{CreateTokenRequest, CreatedToken, Deleted, TokenList};
use concord_core::authz::{authorize, Action, Target};
use concord_core::token::{generate_secret, hash_secret, TokenKind};
use concord_core::{ids, validate, Error};
use concord_store::NewToken;
use std::sync::Arc;

/// Create a token (admin). The secret is in the response only.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = CreateTokenRequest,
    responses((status = 201, body = CreatedToken)))]
pub(crate) async fn create(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Json(req): Json<CreateTokenRequest>,
) -> ApiResult<(StatusCode, axum::Json<CreatedToken>)> {
    authorize(&p, Action::TokenCreate, Target::default())?;
    match (req.kind, &req.entity) {
        (TokenKind::Session, _) => {
            return Err(Error::bad_field(
                "kind",
                "session tokens come from registering an instance",
            )
            .into())
        }
        (TokenKind::Agent, None) => {
            return Err(Error::bad_field("entity", "required for an agent token").into())
        }
        (TokenKind::Agent, Some(e)) => validate::name("entity", e)?,
        (_, Some(_)) => {
            return Err(
                Error::bad_field("entity", "only agent tokens are bound to an entity").into(),
            )
        }
        _ => {}
    }
    if let Some(n) = &req.name {
        validate::label("name", n)?;
    }
    let secret = generate_secret();
    let info = s
        .store
        .create_token(NewToken {
            id: ids::new_id(ids::TOKEN),
            kind: req.kind,
            entity: req.entity,
            name: req.name,
            instance: None,
            secret_hash: hash_secret(&secret),
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedToken {
            id: info.id,
            kind: info.kind,
            entity: info.entity,
            name: info.name,
            created_at: info.created_at,
            token: secret,
        }),
    ))
}

/// List admin, agent and reader tokens (never their secrets).
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens", responses((status = 200, body = TokenList)))]
pub(crate) async fn list(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
) -> ApiResult<axum::Json<TokenList>> {
    authorize(&p, Action::TokenList, Target::default())?;
    Ok(axum::Json(TokenList {
        tokens: s.store.list_tokens().await?,
    }))
}

/// Revoke a token at once: its next call gets 401.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "token id (tok_…)")),
    responses((status = 200, body = Deleted)))]
pub(crate) async fn revoke(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Deleted>> {
    authorize(&p, Action::TokenRevoke, Target::default())?;
    if !s.store.revoke_token(&id).await? {
        return Err(Error::not_found(format!("no live token {id}")).into());
    }
    s.auth.forget(Some(&id), None);
    Ok(axum::Json(Deleted { deleted: true }))
}
