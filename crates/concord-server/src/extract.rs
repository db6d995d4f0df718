//! Request extractors that turn every malformed input into a precise 400/413 in
//! the project's error shape, instead of axum's plain-text rejections.

use crate::error::ApiError;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use concord_core::authz::Principal;
use concord_core::{Error, ErrorCode};
use serde::de::DeserializeOwned;
use serde_json::json;
use std::sync::Arc;

/// A JSON body parsed strictly: the error names the field at fault
/// (`details.field`, a path like `meta.x` or `tasks[3].queue`).
pub struct Json<T>(pub T);

fn too_large() -> ApiError {
    ApiError(Error::new(
        ErrorCode::PayloadTooLarge,
        "request body is over the size limit",
    ))
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError(Error::bad_request(
            "request body must be a JSON document",
        )));
    }
    // Every body of the API is an object. serde would also build a struct from a
    // JSON array (fields by position), which would let `[v, 7]` pass as
    // `{"value": v, "fence": 7}`: refuse anything but an object up front.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError(Error::bad_request(
            "request body must be a JSON object",
        )));
    }
    // The plain parse first: tracking the path of every field costs each good
    // body, and only a bad one needs it, so that one is parsed again.
    if let Ok(v) = serde_json::from_slice::<T>(bytes) {
        return Ok(v);
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            let msg = inner.to_string();
            let field = if path == "." || path.is_empty() {
                // serde reports unknown and missing fields against the parent.
                msg.split('`')
                    .nth(1)
                    .map(str::to_string)
                    .unwrap_or_default()
            } else {
                path
            };
            let message = if field.is_empty() {
                msg.clone()
            } else {
                format!("{field}: {msg}")
            };
            Err(ApiError(
                Error::new(ErrorCode::BadRequest, message).with_details(json!({ "field": field })),
            ))
        }
    }
}

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                ApiError(Error::bad_request(format!(
                    "cannot read request body: {rej}"
                )))
            }
        })?;
        parse_json(&bytes).map(Json)
    }
}

/// An optional JSON body: empty means `T::default()`.
pub struct OptionalJson<T>(pub T);

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                ApiError(Error::bad_request(format!(
                    "cannot read request body: {rej}"
                )))
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        parse_json(&bytes).map(OptionalJson)
    }
}

/// Query string parameters, with errors in the project's shape.
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(q.as_bytes()));
        serde_path_to_error::deserialize::<_, T>(de)
            .map(Query)
            .map_err(|err| {
                let path = err.path().to_string();
                let msg = err.into_inner().to_string();
                let field = if path == "." {
                    msg.split('`').nth(1).unwrap_or("").to_string()
                } else {
                    path
                };
                ApiError(
                    Error::new(
                        ErrorCode::BadRequest,
                        format!("query parameter {field}: {msg}"),
                    )
                    .with_details(json!({ "field": field })),
                )
            })
    }
}

/// The authenticated caller. Every /v1 route takes one: no credentials, 401.
///
/// Credentials are a bearer token or, for the dashboard (`/ui`), its session cookie.
/// The dashboard calls the same `/v1` routes as every other client instead of
/// UI-only endpoints, so what a dashboard user may do is exactly what the one
/// authorization table lets its token do, with nothing to drift. The cookie is
/// accepted for safe methods (GET/HEAD: no route changes anything on them) and,
/// for anything else, only with the session's CSRF token in `X-Concord-CSRF`: a
/// header that no cross-site form can send and no cross-site script can set
/// without a CORS preflight the hub never grants, while `SameSite=Strict` keeps
/// the cookie off cross-site requests in the first place.
pub struct Caller(pub Principal);

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let secret = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|s| !s.is_empty());
        let principal = match secret {
            Some(secret) => {
                state
                    .auth
                    .authenticate(&state.store, &state.metrics, secret)
                    .await?
            }
            None => {
                let session = crate::ui::session_of(parts, state)?.ok_or_else(|| {
                    ApiError(Error::unauthorized(
                        "missing bearer token (Authorization: Bearer <token>)",
                    ))
                })?;
                state
                    .auth
                    .authenticate_hash(&state.store, &state.metrics, session.token_hash)
                    .await?
            }
        };
        state.limits.check(&principal.token_id)?;
        Ok(Caller(principal))
    }
}
