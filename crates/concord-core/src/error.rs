//! The one error type of the project.
//!
//! Every layer (store, server, client) returns this type so that an error keeps its
//! code from the place it was decided (say, the store's fencing check) to the JSON the
//! client reads, without a mapping table at each boundary.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The error codes of DESIGN §9, each with its fixed HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    UnknownInstance,
    Conflict,
    PrimaryHeld,
    Fenced,
    StaleClaim,
    LeaseConflict,
    NoPeers,
    CursorExpired,
    MethodNotAllowed,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound | ErrorCode::UnknownInstance => 404,
            ErrorCode::Conflict
            | ErrorCode::PrimaryHeld
            | ErrorCode::Fenced
            | ErrorCode::StaleClaim
            | ErrorCode::LeaseConflict
            | ErrorCode::NoPeers => 409,
            ErrorCode::CursorExpired => 410,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::UnknownInstance => "unknown_instance",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PrimaryHeld => "primary_held",
            ErrorCode::Fenced => "fenced",
            ErrorCode::StaleClaim => "stale_claim",
            ErrorCode::LeaseConflict => "lease_conflict",
            ErrorCode::NoPeers => "no_peers",
            ErrorCode::CursorExpired => "cursor_expired",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// An error with a code, a human message and machine-readable details
/// (`details.field` names the request field at fault for `bad_request`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
    pub details: Value,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
            details: Value::Null,
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    /// A 400 naming the field at fault, e.g. `bad_field("ttl_ms", "must be between ...")`.
    pub fn bad_field(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Error::new(ErrorCode::BadRequest, format!("{field}: {message}"))
            .with_details(json!({ "field": field }))
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::BadRequest, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Unauthorized, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Forbidden, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Conflict, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Unavailable, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Internal, message)
    }
    pub fn unknown_instance(id: &str) -> Self {
        Error::new(
            ErrorCode::UnknownInstance,
            format!("instance {id} is unknown, expired or closed"),
        )
        .with_details(json!({ "instance": id }))
    }
    pub fn fenced(epoch: u64, message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Fenced, message).with_details(json!({ "epoch": epoch }))
    }

    /// The wire form `{"error": {"code", "message", "details"}}`.
    pub fn to_body(&self) -> Value {
        let mut e = json!({ "code": self.code.as_str(), "message": self.message });
        if !self.details.is_null() {
            e["details"] = self.details.clone();
        }
        json!({ "error": e })
    }

    /// Parses the wire form back (the client uses it); `None` if it is not one.
    pub fn from_body(body: &Value) -> Option<Error> {
        let e = body.get("error")?;
        let code: ErrorCode = serde_json::from_value(e.get("code")?.clone()).ok()?;
        let message = e
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let details = e.get("details").cloned().unwrap_or(Value::Null);
        Some(Error {
            code,
            message,
            details,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trips() {
        let e = Error::fenced(7, "stale fence");
        let back = Error::from_body(&e.to_body()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.code.status(), 409);
    }

    #[test]
    fn bad_field_names_the_field() {
        let e = Error::bad_field("ttl_ms", "too small");
        assert_eq!(e.details["field"], "ttl_ms");
        assert!(e.message.starts_with("ttl_ms:"));
    }
}
