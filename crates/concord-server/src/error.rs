//! The one error type handlers return. It wraps the project-wide
//! [`concord_core::Error`] and renders `{"error": {"code", "message", "details"}}` with
//! the code's status, so every failure, from a bad field to a fenced write, reaches
//! the client in one shape.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use concord_core::{Error, ErrorCode};

#[derive(Debug)]
pub struct ApiError(pub Error);

pub type ApiResult<T> = Result<T, ApiError>;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.0;
        if e.code == ErrorCode::Internal {
            tracing::error!(message = %e.message, "internal error");
        }
        let status =
            StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = (e.code == ErrorCode::RateLimited)
            .then(|| e.details.get("retry_after_ms").and_then(|v| v.as_u64()))
            .flatten();
        let mut resp = (status, axum::Json(e.to_body())).into_response();
        if let Some(ms) = retry_after {
            let secs = ms.div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if e.code == ErrorCode::Unauthorized {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
