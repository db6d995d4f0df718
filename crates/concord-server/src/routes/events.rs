use super::instances::require_labelled;
use crate::bus::Subscription;
use crate::error::ApiResult;
use crate::extract::{Caller, Json, Query};
use crate::AppState;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use concord_core::api::{EventSource, EventsPage, PublishRequest, Published};
use concord_core::authz::{authorize, Action, Target};
use concord_core::idempotency;
use concord_core::topic::{is_reserved, validate_topic, PatternSet};
use concord_core::validate::json_size;
use concord_core::{Error, ErrorCode};
use serde::Deserialize;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// Largest `data` of one event.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
const MAX_WAIT_MS: u64 = 60_000;

/// Publish an event. `sys.…` topics are the hub's own. The same `idempotency_key`
/// again (from the same entity) appends nothing and returns the first event's seq
/// (200, `deduplicated`).
#[utoipa::path(post, path = "/v1/events", tag = "events", request_body = PublishRequest,
    responses((status = 201, body = Published), (status = 200, body = Published)))]
pub(crate) async fn publish(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Json(req): Json<PublishRequest>,
) -> ApiResult<(StatusCode, axum::Json<Published>)> {
    validate_topic("topic", &req.topic)?;
    json_size("data", &req.data, MAX_EVENT_BYTES)?;
    if let Some(k) = &req.idempotency_key {
        idempotency::validate_key("idempotency_key", k)?;
    }
    authorize(
        &p,
        Action::EventPublish,
        Target {
            entity: p.entity.as_deref(),
            instance: p.instance.as_deref(),
        },
    )?;
    if is_reserved(&req.topic) {
        return Err(Error::forbidden(format!(
            "topic {:?}: sys.* is reserved for the hub",
            req.topic
        ))
        .into());
    }
    require_labelled(&s, &p).await?;
    let source = EventSource {
        instance: p.instance.clone(),
        entity: p.entity.clone(),
        token: Some(p.token_id.clone()),
    };
    let (seq, deduplicated) = match &req.idempotency_key {
        Some(key) => {
            s.store
                .publish_once(&req.topic, source, req.data, &idempotency::scope(&p), key)
                .await?
        }
        None => (s.store.publish(&req.topic, source, req.data).await?, false),
    };
    let status = if deduplicated {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, axum::Json(Published { seq, deduplicated })))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadQuery {
    /// Comma-separated patterns: `*` one word, `>` the rest. Default: everything.
    topics: Option<String>,
    /// Return events with seq > from. Default: the oldest retained.
    from: Option<i64>,
    /// At most this many events (1..=1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// Wait up to this long for a first matching event (0..=60000).
    #[param(maximum = 60000)]
    wait_ms: Option<u64>,
}

async fn start_cursor(s: &AppState, from: Option<i64>) -> ApiResult<i64> {
    match from {
        Some(f) if f < 0 => Err(Error::bad_field("from", "must be >= 0").into()),
        Some(f) => Ok(f),
        None => Ok(s.store.event_floor().await?),
    }
}

/// Read events by long-poll: returns as soon as one matches, or empty at `wait_ms`.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(ReadQuery),
    responses((status = 200, body = EventsPage)))]
pub(crate) async fn read(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    Query(q): Query<ReadQuery>,
) -> ApiResult<axum::Json<EventsPage>> {
    authorize(&p, Action::EventRead, Target::default())?;
    let patterns = PatternSet::parse("topics", q.topics.as_deref())?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Error::bad_field("limit", "must be between 1 and 1000").into());
    }
    let wait_ms = q.wait_ms.unwrap_or(0);
    if wait_ms > MAX_WAIT_MS {
        return Err(Error::bad_field("wait_ms", format!("at most {MAX_WAIT_MS}")).into());
    }
    let from = start_cursor(&s, q.from).await?;
    let _slot = s.limits.long_poll(&p.token_id)?;
    let mut sub = Subscription::new(s.clone(), patterns, from);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    let mut events = Vec::new();
    // What the log already holds comes first, whatever wait_ms says; only an empty
    // answer waits for a publish, and then takes what arrived with it.
    loop {
        while events.len() < limit {
            match sub.next_ready().await? {
                Some(e) => events.push(e.event().clone()),
                None => break,
            }
        }
        if !events.is_empty() {
            break;
        }
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(e) => events.push(e?.event().clone()),
            Err(_) => break,
        }
    }
    Ok(axum::Json(EventsPage {
        events,
        next: sub.resume_point(),
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamQuery {
    topics: Option<String>,
    /// Resume after this seq; the `Last-Event-ID` header wins over it.
    from: Option<i64>,
}

/// Server-sent events: `id: <seq>`, `event: <topic>`, `data: <event json>`.
/// Resumes from `Last-Event-ID`; keep-alive comments every 15 s.
#[utoipa::path(get, path = "/v1/events/stream", tag = "events", params(StreamQuery),
    responses((status = 200, description = "text/event-stream")))]
pub(crate) async fn stream(
    State(s): State<Arc<AppState>>,
    Caller(p): Caller,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> ApiResult<Response> {
    authorize(&p, Action::EventRead, Target::default())?;
    let patterns = PatternSet::parse("topics", q.topics.as_deref())?;
    let last_id = match headers.get("last-event-id").and_then(|v| v.to_str().ok()) {
        Some(v) => Some(
            v.trim()
                .parse::<i64>()
                .map_err(|_| Error::bad_field("Last-Event-ID", "must be an event seq"))?,
        ),
        None => None,
    };
    let from = start_cursor(&s, last_id.or(q.from)).await?;
    let slot = s.limits.stream(&p.token_id)?;
    let stream = SseStream {
        sub: Subscription::new(s.clone(), patterns, from),
        keep_alive: Box::pin(tokio::time::sleep(SSE_KEEP_ALIVE)),
        last_write: tokio::time::Instant::now(),
        _slot: slot,
    };
    let body = futures::stream::unfold(Some(stream), |st| async move {
        let mut st = st?;
        match st.next_chunk().await {
            Ok(chunk) => Some((Ok::<_, Infallible>(chunk), Some(st))),
            Err(err) => {
                let code = if err.code == ErrorCode::CursorExpired {
                    "cursor_expired"
                } else {
                    "error"
                };
                let frame = format!("event: {code}\ndata: {}\n\n", err.to_body());
                // Send this last event, then end the stream.
                Some((Ok(Bytes::from(frame)), None))
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// A keep-alive comment when nothing was written for this long.
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Bytes of frames gathered into one write.
const SSE_CHUNK: usize = 64 * 1024;

/// One SSE response: its subscription, and the keep-alive timer.
///
/// Why the timer lives here and is not reset per write: arming a timeout for every
/// chunk cost more than the write at 5,000 events/s × 100 streams. The one sleep
/// fires at most every 15 s; if something was written since, it is pushed back to
/// 15 s after that write, else a comment goes out.
struct SseStream {
    sub: Subscription,
    keep_alive: std::pin::Pin<Box<tokio::time::Sleep>>,
    last_write: tokio::time::Instant,
    _slot: crate::limits::Slot,
}

impl SseStream {
    /// The next write: the next event, and every further event already in hand,
    /// as one chunk of pre-encoded frames (see `bus::BusEvent`), so a burst costs
    /// one write instead of one per event.
    async fn next_chunk(&mut self) -> concord_core::Result<Bytes> {
        let first = loop {
            tokio::select! {
                e = self.sub.next() => break e?,
                () = &mut self.keep_alive => {
                    let due = self.last_write + SSE_KEEP_ALIVE;
                    if due > tokio::time::Instant::now() {
                        self.keep_alive.as_mut().reset(due);
                        continue;
                    }
                    self.last_write = tokio::time::Instant::now();
                    self.keep_alive.as_mut().reset(self.last_write + SSE_KEEP_ALIVE);
                    return Ok(Bytes::from_static(b":\n\n"));
                }
            }
        };
        let mut out = bytes::BytesMut::with_capacity(first.sse_frame().len() * 4);
        out.extend_from_slice(first.sse_frame());
        while out.len() < SSE_CHUNK {
            match self.sub.next_ready().await? {
                Some(e) => out.extend_from_slice(e.sse_frame()),
                None => break,
            }
        }
        self.last_write = tokio::time::Instant::now();
        Ok(out.freeze())
    }
}
