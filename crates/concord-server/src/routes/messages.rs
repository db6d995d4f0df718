use super::instances::require_labelled;
use crate::error::ApiResult;
use crate::extract::{Caller, Json, Query};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use concord_core::address::Address;
use concord_core::api::{Acked, InboxPage, MessageFrom, SendMessageRequest, SentMessage};
use concord_core::authz::{authorize, Action, Principal, Target};
use concord_core::validate::{json_size, label};
use concord_core::{ids, Error};
use concord_store::{topics, NewMessage};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

pub const MAX_BODY_BYTES: usize = 64 * 1024;
const MAX_WAIT_MS: u64 = 60_000;

/// Send a message to an instance, every live instance of an entity, an entity's
/// primary, or every live instance with a capability.
#[utoipa::path(post, path = "/v1/messages", tag = "messages", request_body = SendMessageRequest,
    responses((status = 201, body = SentMessage)))]
pub(crate) async fn send(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Json(req): Json<SendMessageRequest>,
) -> ApiResult<(StatusCode, axum::Json<SentMessage>)> {
    let to = Address::parse("to", &req.to)?;
    if req.subject.len() > 1024 {
        return Err(Error::bad_field("subject", "at most 1024 bytes").into());
    }
    json_size("body", &req.body, MAX_BODY_BYTES)?;
    if let Some(t) = &req.thread_id {
        label("thread_id", t)?;
    }
    authorize(
        &p,
        Action::MessageSend,
        Target {
            entity: p.entity.as_deref(),
            instance: p.instance.as_deref(),
        },
    )?;
    require_labelled(&s, &p).await?;
    let sent = s
        .store
        .send_message(NewMessage {
            id: ids::new_id(ids::MESSAGE),
            thread_id: req.thread_id,
            from: MessageFrom {
                instance: p.instance.clone(),
                entity: p.entity.clone(),
            },
            token: p.token_id.clone(),
            to,
            to_text: req.to,
            subject: req.subject,
            body: req.body,
            ack_required: req.ack_required,
        })
        .await?;
    Ok((StatusCode::CREATED, axum::Json(sent)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct InboxQuery {
    /// Cursor: messages after it (default 0, the whole inbox).
    after: Option<i64>,
    /// 1..=1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// Wait up to this long for a message (0..=60000).
    #[param(maximum = 60000)]
    wait_ms: Option<u64>,
    /// Only messages not acked yet (they come back until acked).
    unacked_only: Option<bool>,
}

fn own_instance(p: &Principal) -> ApiResult<&str> {
    p.instance
        .as_deref()
        .ok_or_else(|| Error::forbidden("only an instance (session token) has an inbox").into())
}

/// Read this instance's inbox (session token), long-polling with `wait_ms`.
#[utoipa::path(get, path = "/v1/inbox", tag = "messages", params(InboxQuery),
    responses((status = 200, body = InboxPage)))]
pub(crate) async fn inbox(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Query(q): Query<InboxQuery>,
) -> ApiResult<axum::Json<InboxPage>> {
    let me = own_instance(&p)?;
    authorize(
        &p,
        Action::InboxRead,
        Target {
            entity: None,
            instance: Some(me),
        },
    )?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Error::bad_field("limit", "must be between 1 and 1000").into());
    }
    let wait_ms = q.wait_ms.unwrap_or(0);
    if wait_ms > MAX_WAIT_MS {
        return Err(Error::bad_field("wait_ms", format!("at most {MAX_WAIT_MS}")).into());
    }
    let after = q.after.unwrap_or(0);
    let unacked = q.unacked_only.unwrap_or(false);
    let _slot = s.limits.long_poll(&p.token_id)?;
    // Listen before reading, so a delivery between the read and the wait wakes us.
    let mut rx = s.bus.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    loop {
        let messages = s.store.read_inbox(me, after, limit, unacked).await?;
        if !messages.is_empty() || tokio::time::Instant::now() >= deadline {
            let next = messages.last().map(|m| m.cursor).unwrap_or(after);
            return Ok(axum::Json(InboxPage { messages, next }));
        }
        // Wait for a delivery to this instance (or a lag, which may hide one).
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => break,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => break,
                Ok(Err(_)) => return Err(Error::unavailable("the hub is shutting down").into()),
                Ok(Ok(e)) if e.topic == topics::MESSAGE_SENT => {
                    let to_me = e.data["delivered_to"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|v| v == me));
                    if to_me {
                        break;
                    }
                }
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// Acknowledge a message in this instance's inbox.
#[utoipa::path(post, path = "/v1/inbox/{id}/ack", tag = "messages", params(("id" = String, Path)),
    responses((status = 200, body = Acked)))]
pub(crate) async fn ack(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Acked>> {
    let me = own_instance(&p)?;
    authorize(
        &p,
        Action::InboxRead,
        Target {
            entity: None,
            instance: Some(me),
        },
    )?;
    if !s.store.ack_message(me, &id).await? {
        return Err(Error::not_found(format!("no message {id} in the inbox of {me}")).into());
    }
    Ok(axum::Json(Acked { acked: true }))
}
